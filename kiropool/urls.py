from django.contrib import admin
from django.urls import include, path

from kiropool import health, views

urlpatterns = [
    path("", views.home, name="home"),
    path("admin/", admin.site.urls),
    # operator API (staff only): accounts/apis.py, routing/operator_apis.py
    path("api/v1/admin/", include("kiropool.operator_urls")),
    # gateway API (dispatch, complete, explain): routing/apis.py
    path("api/v1/", include("routing.urls")),
    # the API's description (drf-spectacular's views, their errors in the one shape): kiropool/views.py
    path("api/schema/", views.SchemaView.as_view(), name="schema"),
    path("api/docs/", views.DocsView.as_view(url_name="schema"), name="docs"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics_view, name="metrics"),
    path("dashboard/", include("routing.dashboard.urls")),
]

handler400 = "kiropool.views.bad_request"
handler404 = "kiropool.views.not_found"
handler500 = "kiropool.views.server_error"
