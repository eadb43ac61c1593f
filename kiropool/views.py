"""The site root, and error pages that keep the one error shape under /api/ (an unknown path,
a crash) while people browsing the admin or dashboards get Django's pages."""

from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views import defaults
from django.views.decorators.http import require_GET

from core.errors import error_body


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


@require_GET
def home(request):
    """``/``: staff to the dashboard; anyone else to the login, then the dashboard."""
    dashboard = reverse("dashboard:index")
    if request.user.is_active and request.user.is_staff:
        return redirect(dashboard)
    return redirect_to_login(dashboard, login_url=reverse("admin:login"))
