from django.urls import path

app_name = "routing"

urlpatterns: list = []
