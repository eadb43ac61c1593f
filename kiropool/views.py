"""Error pages that keep the one error shape under /api/ (an unknown path,
a crash) while people browsing the admin or dashboards get Django's pages."""

from django.http import JsonResponse
from django.views import defaults

from kiropool.errors import error_body


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def not_found(request, exception):
    if _is_api(request):
        return JsonResponse(error_body(404, "no such endpoint"), status=404)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if _is_api(request):
        return JsonResponse(error_body(500, "internal error"), status=500)
    return defaults.server_error(request)
