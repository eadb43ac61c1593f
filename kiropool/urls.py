from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from kiropool import health, views

urlpatterns = [
    path("", views.home, name="home"),
    path("admin/", admin.site.urls),
    # operator API (staff only): accounts/apis.py, routing/operator_apis.py
    path("api/v1/admin/", include("kiropool.operator_urls")),
    # gateway API (dispatch, complete, explain): routing/apis.py
    path("api/v1/", include("routing.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics_view, name="metrics"),
    path("dashboard/", include("routing.dashboard.urls")),
]

handler404 = "kiropool.views.not_found"
handler500 = "kiropool.views.server_error"
