"""The Docker tests' image: a debootstrap rootfs imported with `python3 build.py test-image`."""

TEST_IMAGE = "hivemind-test-python:bookworm"
# TEST_IMAGE with the whole standard library, which the ml and data runners need (build.py).
STDLIB_IMAGE = "hivemind-test-python-stdlib:bookworm"
