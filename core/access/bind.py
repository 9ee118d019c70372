"""Where the web server may listen: with no sign-in (AUTH_MODE=none) anyone who reaches the port is
the local editor, so such a server listens on the machine's own loopback address only.

`.streamlit/config.toml` sets `server.address = "127.0.0.1"`, so `make run` binds loopback unless
told otherwise (STREAMLIT_SERVER_ADDRESS, `--server.address`); serve.py calls `check_listen_address`
before the app serves its first request and stops the server when the address is refused.
"""

from __future__ import annotations

import ipaddress

from core.errors import UserError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost; False for wildcards (0.0.0.0, ::, "")."""
    address = address.strip().strip("[]").lower()
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def check_listen_address(auth_mode: str, address: str | None) -> None:
    """Refuse to serve the app without sign-in on an address other machines can reach."""
    if auth_mode != "none" or is_loopback(address or ""):
        return
    shown = address or "every interface (server.address unset)"
    raise UserError(
        f"Refusing to listen on {shown} with AUTH_MODE=none: without sign-in anyone who reaches the port "
        "would act as an editor. Set AUTH_MODE=password (accounts: `python -m core.access.accounts add "
        "NAME --role editor`) or AUTH_MODE=oidc to serve other machines, or listen on 127.0.0.1 "
        "(STREAMLIT_SERVER_ADDRESS=127.0.0.1, the default of .streamlit/config.toml)."
    )
