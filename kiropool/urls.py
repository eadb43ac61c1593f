from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # gateway API (dispatch, complete, explain): routing/apis.py
    path("api/v1/", include("routing.urls")),
]
