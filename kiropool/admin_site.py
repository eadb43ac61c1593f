"""The admin as kiropool's: its name in the header and the browser tab, a
"View site" link to the dashboards, and the dashboards on its index page,
both for those who may view them."""

from django.contrib import admin
from django.urls import reverse_lazy

from routing.dashboard.views import OVERVIEW_MODELS, views_missing


class KiropoolAdminSite(admin.AdminSite):
    site_header = "kiropool"
    site_title = "kiropool"
    index_title = "kiropool administration"
    # "View site": the site an operator means is the pool's dashboard.
    site_url = reverse_lazy("dashboard:index")
    index_template = "admin/kiropool_index.html"

    def each_context(self, request):
        # A staff user without the view permissions the dashboard needs gets
        # its 403: no link leads there (no "View site", no dashboards box).
        context = super().each_context(request)
        context["dashboards_viewable"] = not views_missing(request.user, OVERVIEW_MODELS)
        if not context["dashboards_viewable"]:
            context["site_url"] = None
        return context
