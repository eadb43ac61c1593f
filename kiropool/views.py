"""The site root, the API's description, and error pages that keep the one error shape under
/api/ (an unknown path, a refused host, a crash) while people browsing the admin or dashboards get Django's pages."""

from django.contrib.auth.views import redirect_to_login
from django.http import JsonResponse
from django.shortcuts import redirect
from django.urls import is_valid_path, reverse
from django.views import defaults
from django.views.decorators.http import require_GET
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.settings import api_settings

from core.errors import error_body
from routing.dashboard.views import OVERVIEW_MODELS, views_missing


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def not_found(request, exception):
    if _is_api(request):
        return JsonResponse(error_body(404, _no_such_endpoint(request)), status=404)
    return defaults.page_not_found(request, exception)


def _no_such_endpoint(request) -> str:
    """Names the path that exists with (or without) the trailing slash: the
    API answers only the form it documents, it does not redirect
    (core/middleware.CommonMiddleware)."""
    if is_valid_path(_slash_toggled(request.path_info), getattr(request, "urlconf", None)):
        return f"no such endpoint; did you mean {_slash_toggled(request.path)}?"
    return "no such endpoint"


def _slash_toggled(path: str) -> str:
    return path.removesuffix("/") if path.endswith("/") else f"{path}/"


def bad_request(request, exception):
    # A request Django refuses before any view (a Host header not in ALLOWED_HOSTS).
    if _is_api(request):
        return JsonResponse(error_body(400, "bad request"), status=400)
    return defaults.bad_request(request, exception)


def server_error(request):
    if _is_api(request):
        return JsonResponse(error_body(500, "internal error"), status=500)
    return defaults.server_error(request)


@require_GET
def home(request):
    """``/``: staff to the dashboard (to the admin if they may not view it);
    anyone else to the login, then the dashboard."""
    dashboard = reverse("dashboard:index")
    if request.user.is_active and request.user.is_staff:
        return redirect(reverse("admin:index") if views_missing(request.user, OVERVIEW_MODELS) else dashboard)
    return redirect_to_login(dashboard, login_url=reverse("admin:login"))


def _in_json(response):
    """The response rendered by the API's JSON renderer, whatever the view negotiated."""
    renderer = api_settings.DEFAULT_RENDERER_CLASSES[0]()
    response.accepted_renderer, response.accepted_media_type = renderer, renderer.media_type
    return response


class SchemaView(SpectacularAPIView):
    """``/api/schema/``: the schema in YAML (or JSON, as asked), and its errors (a
    wrong method, format or ``Accept``) in the one JSON error shape, as
    everywhere under /api/: drf-spectacular answered them in YAML."""

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        return _in_json(response) if getattr(response, "exception", False) else response


class DocsView(SpectacularSwaggerView):
    """``/api/docs/``: Swagger UI's page in HTML, anything else in JSON: its errors
    in the one error shape (drf-spectacular's were a text/html "405 Method Not
    Allowed"), and its description for ``OPTIONS`` (the HTML renderer has no
    template for it: a 500)."""

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        return response if getattr(response, "template_name", None) else _in_json(response)
