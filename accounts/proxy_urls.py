"""A proxy's URL usually carries its password (``http://user:password@host:port``).

Gateways receive it whole in their dispatch response: that is what it is for.
Everywhere an operator reads it (the admin, the operator API, the latency
figures, the exports) it is shown with the password masked, and a write that
sends the masked form back unchanged keeps the stored password. The mask is
never stored: anywhere else it is refused (``Proxy.clean``), since a masked
password with another host, user or port would hand the stored password to a
proxy the operator never typed it for (README, Security)."""

from __future__ import annotations

import re

PASSWORD_MASK = "***"


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password is: after the first ``:`` of the user info, up to
    its last ``@`` (a password may hold an unencoded ``@`` or ``/``; one
    ``@`` further on masks too much rather than too little)."""
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    at = url.rfind("@", start)
    colon = url.find(":", start, at) if at > 0 else -1
    if colon < 0 or colon + 1 == at:
        return None
    return colon + 1, at


def proxy_url_masked(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    span = _password_span(url)
    return url if span is None else url[: span[0]] + PASSWORD_MASK + url[span[1] :]


def proxy_url_has_mask(url: str) -> bool:
    """Whether ``url``'s password is the mask itself."""
    span = _password_span(url)
    return span is not None and url[span[0] : span[1]] == PASSWORD_MASK


def proxy_url_unmasked(url: str, *, stored: str | None) -> str:
    """The URL a write of ``url`` over ``stored`` (``None`` for a new proxy)
    stores: ``stored`` itself when ``url`` is its masked form, as read (the
    operator left it untouched), else ``url`` as sent."""
    if stored is not None and url == proxy_url_masked(stored):
        return stored
    return url


# A URL with a password inside free text: the scheme, the user and its colon,
# then the password up to the last "@" before a space or a quote (more masked
# rather than less, as above).
_PASSWORD_IN_TEXT = re.compile(r"""(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'"]*:)[^\s'"]*@""")


def passwords_masked(text: str) -> str:
    """``text`` (a gateway's error message, say) with the password of every
    URL in it masked: an upstream's or a proxy library's exception often
    names the proxy it went through, URL and all."""
    if "://" not in text or "@" not in text:
        return text
    return _PASSWORD_IN_TEXT.sub(lambda m: m.group(1) + PASSWORD_MASK + "@", text)
