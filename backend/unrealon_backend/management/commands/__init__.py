"""C{manage.py unrealon_worker} and C{manage.py unrealon_events}."""
