"""Django management commands of unrealon_backend (add "unrealon_backend" to INSTALLED_APPS)."""
