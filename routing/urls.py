from django.urls import path

from routing import apis

app_name = "routing"

urlpatterns = [
    path("dispatch", apis.DispatchApi.as_view(), name="dispatch"),
    path("dispatch/explain", apis.DispatchExplainApi.as_view(), name="dispatch-explain"),
    path("leases/<uuid:lease_id>/complete", apis.LeaseCompleteApi.as_view(), name="lease-complete"),
]
