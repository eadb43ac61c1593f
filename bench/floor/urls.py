from django.urls import path

from bench.floor.apis import FloorApi, healthz

urlpatterns = [
    path("floor/<int:pk>", FloorApi.as_view()),
    path("healthz", healthz),
]
