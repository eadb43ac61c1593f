"""The operator API under ``/api/v1/admin/`` (SPEC §5): DRF routers, every
path ending in ``/``."""

from rest_framework.routers import SimpleRouter

from accounts import apis as pool
from routing import operator_apis as decision

app_name = "operator"

router = SimpleRouter()
router.register("identities", pool.RoutingIdentityViewSet, basename="identity")
router.register("accounts", pool.AccountViewSet, basename="account")
router.register("proxies", pool.ProxyViewSet, basename="proxy")
router.register("groups", pool.AccountGroupViewSet, basename="group")
router.register("keys", pool.ApiKeyViewSet, basename="key")
router.register("bindings", decision.SessionBindingViewSet, basename="binding")
router.register("latency", decision.LatencySnapshotViewSet, basename="latency")

urlpatterns = router.urls
