"""The framework floor for `make bench`: a minimal DRF endpoint doing one
indexed SELECT, served by the same gunicorn as the dispatcher. Mounted only
when KIROPOOL_BENCH_FLOOR is set."""

from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.models import Account


class FloorApi(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    def post(self, request, pk: int):
        name = Account.objects.filter(pk=pk).values_list("name", flat=True).first()
        return Response({"name": name})
