from django.http import JsonResponse
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import Account


class FloorApi(APIView):
    """One indexed SELECT (an account's name by primary key), answered as JSON through DRF."""

    def post(self, request, pk: int):
        name = Account.objects.filter(pk=pk).values_list("name", flat=True).first()
        return Response({"name": name})


def healthz(request):
    """What core.webserver.WebServer waits for before it reports the server up."""
    return JsonResponse({"status": "ok"})
