"""The desktop app: tray icon, dashboard and settings dialog around a QThread-hosted engine."""
