"""The admin as kiropool's: its name in the header and the browser tab, a
"View site" link to the dashboards, and the dashboards on its index page."""

from django.contrib import admin
from django.urls import reverse_lazy


class KiropoolAdminSite(admin.AdminSite):
    site_header = "kiropool"
    site_title = "kiropool"
    index_title = "kiropool administration"
    # "View site": the site an operator means is the pool's dashboard.
    site_url = reverse_lazy("dashboard:index")
    index_template = "admin/kiropool_index.html"
