"""The Docker tests' image: a debootstrap rootfs imported with `python3 build.py test-image`."""

TEST_IMAGE = "hivemind-test-python:bookworm"
