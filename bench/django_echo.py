"""
The direct path bench/backend_rpc.py compares with: the same handler as a
Django view, served by gunicorn (threads), called over keep-alive HTTP.

    gunicorn -k gthread --threads 32 -w 1 django_echo:application   (cwd: bench/)

A minimal Django project in one module: no database, no sessions, no
middleware but CommonMiddleware -- the cheapest a real view gets.  The view
checks its params as the server checks a backend method's (the same
schema, by hand here), so both paths do the same work per call.
"""

from __future__ import annotations

import json
from typing import Any

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-only-not-secret",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
)
django.setup()

from backend_handlers import echo_result  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


@csrf_exempt
def echo(request: HttpRequest) -> JsonResponse:
    try:
        params: Any = json.loads(request.body)
    except ValueError:
        return JsonResponse({"error": "not JSON"}, status=400)
    text = params.get("text") if isinstance(params, dict) else None
    if not isinstance(text, str) or len(text) > 4096 or set(params) != {"text"}:
        return JsonResponse({"error": "invalid params"}, status=400)
    return JsonResponse({"result": echo_result(text)})


urlpatterns = [path("rpc/bench.echo", echo)]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
