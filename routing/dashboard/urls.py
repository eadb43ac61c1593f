"""The operators' dashboards, mounted at ``/dashboard/``."""

from django.urls import path

from routing.dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.pool_overview, name="index"),
    # ``path``: an account name may contain a slash.
    path("accounts/<path:name>/", views.account_detail, name="account"),
    path("bindings/<int:binding_id>/unbind/", views.binding_unbind, name="binding-unbind"),
]
