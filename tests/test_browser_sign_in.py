"""A password sign-in that lasts, in a real browser: a reload and a new tab of the same browser stay
signed in; signing out, or removing the account on the server, ends it for every tab."""

from __future__ import annotations

import os
import subprocess
import sys

from core.access import accounts
from core.access.accounts import EDITOR
from tests.server import ROOT, free_port, start_app, stop_app, wait_healthy
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

PASSWORD = "correct horse battery"


def test_a_sign_in_survives_a_reload_and_a_new_tab_until_sign_out_or_removal(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    home, accounts_file = tmp_path / "home", tmp_path / "accounts.toml"
    accounts.write_accounts(
        accounts_file, accounts.Accounts({"ana": accounts.Account("ana", accounts.hash_password(PASSWORD), EDITOR)})
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        "APP_HOME": str(home),
        "AUTH_MODE": "password",
        "AUTH_FILE": str(accounts_file),
        "START_WORKER": "0",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        server = start_app(port, env, log)
        try:
            wait_healthy(url, server, log=tmp_path / "server.log")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.set_default_timeout(60_000)
                signed_in = page.get_by_role("heading", name="Lymphoma subtype recognition")
                sign_in_form = page.get_by_role("button", name="Sign in")

                def sign_in(password: str) -> None:
                    page.get_by_label("User name").fill("ana")
                    page.get_by_label("Password", exact=True).fill(password)
                    sign_in_form.click()

                page.goto(url)
                sign_in("wrong")
                expect(page.get_by_text("Wrong user name or password.")).to_be_visible()
                expect(page.get_by_label("User name")).to_have_value("ana")  # kept for the second try
                page.get_by_label("Password", exact=True).fill(PASSWORD)
                sign_in_form.click()
                expect(page.get_by_test_id("stSidebar").get_by_text("ana")).to_be_visible()

                page.reload()
                expect(page.get_by_test_id("stSidebar").get_by_text("ana")).to_be_visible()
                other = context.new_page()
                other.goto(url + "/runs")
                expect(other.get_by_test_id("stSidebar").get_by_text("ana")).to_be_visible(timeout=60_000)

                page.get_by_role("button", name="Sign out").click()
                expect(sign_in_form).to_be_visible()
                other.reload()
                expect(other.get_by_role("button", name="Sign in")).to_be_visible(timeout=60_000)

                sign_in(PASSWORD)
                expect(signed_in).to_be_visible()
                removed = subprocess.run(
                    [sys.executable, "-m", "core", "accounts", "remove", "ana"],
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert removed.returncode == 0 and "signed ana out of 1 browser(s)" in removed.stdout, removed
                page.reload()
                expect(sign_in_form).to_be_visible()
                browser.close()
        finally:
            stop_app(server)
