"""The admin console (/admin/console) and the key holder's page
(/api/usage/console) driven in headless Chromium (Debian's chromium and
chromium-driver, installed by `make browser`): sign in, create a key and
copy its secret, use it, see it in the charts and the log, disable it and
see the relay refuse it; a holder sees only their own figures; hostile
names stay text; no request leaves for another host. Every page is
screenshot at desktop and phone width into .cache/screenshots/."""

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import anthropic
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as seen
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ADMIN_PASSWORD, REPO, admin_of, running_relay

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOTS = REPO / ".cache" / "screenshots"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
MODEL_A = "claude-haiku-5-5"
MODEL_B = "claude-opus-5-1"
HOSTILE = "<img src=x onerror=alert(1)>"
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SHOTS_TAKEN = []


@pytest.fixture(scope="module")
def relay(binaries, tmp_path_factory):
    with running_relay(binaries, tmp_path_factory.mktemp("console-logs")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium and chromium-driver are not installed: run `make browser`")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--disable-features=Translate,OptimizationHints,MediaRouter"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module", autouse=True)
def report_screenshots(request):
    yield
    if SHOTS_TAKEN:
        # Printed past pytest's capture, so a passing run lists them too.
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nconsole screenshots ({len(SHOTS_TAKEN)}), for a reviewer to look at:")
            for path in SHOTS_TAKEN:
                print(f"  {path}")


def wait(driver, condition, timeout=20):
    # A list re-rendered under the check makes its rows stale: look again.
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(condition)


def screenshot(driver, name, dark=False):
    """The whole page at each width (in the dark scheme too if `dark`),
    then back to desktop and the light scheme."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if dark:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        screenshot(driver, f"{name}-dark")
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    for size, (width, height) in SIZES.items():
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": size == "phone"})
        full = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": min(max(height, full), 6000), "deviceScaleFactor": 1,
                                "mobile": size == "phone"})
        path = SCREENSHOTS / f"{name}-{size}.png"
        driver.save_screenshot(str(path))
        SHOTS_TAKEN.append(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def requested_urls(driver):
    """Every URL the page asked the network for since the last call."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_only_the_relay_was_asked(driver, relay):
    urls = requested_urls(driver)
    assert urls, "no request was logged: is performance logging on?"
    relay_origin = urlsplit(relay["base"])
    foreign = [u for u in urls if (urlsplit(u).scheme, urlsplit(u).netloc) != (relay_origin.scheme, relay_origin.netloc)]
    assert foreign == [], f"requests left for other hosts: {foreign}"


def sign_in(driver, relay):
    driver.get(f"{relay['base']}/admin/console")
    wait(driver, seen.visibility_of_element_located((By.ID, "login-password"))).send_keys(ADMIN_PASSWORD)
    driver.find_element(By.ID, "login-submit").click()
    wait(driver, seen.visibility_of_element_located((By.ID, "view-keys")))
    wait(driver, lambda d: "keys" in d.find_element(By.ID, "keys-table").text)


def open_view(driver, view):
    driver.find_element(By.CSS_SELECTOR, f'#nav button[data-view="{view}"]').click()
    section = wait(driver, seen.visibility_of_element_located((By.ID, f"view-{view}")))
    wait(driver, lambda d: d.find_element(By.ID, f"{view}-status").text == "")
    return section


def key_row(driver, name):
    for row in driver.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr"):
        if row.find_element(By.CSS_SELECTOR, ".key-name").text == name:
            return row
    return None


def client_of(relay, secret):
    return anthropic.Anthropic(base_url=relay["base"], api_key=secret, max_retries=0)


def ask(relay, secret, model, max_tokens=7):
    return client_of(relay, secret).messages.create(
        model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "hello from the console test"}])


def logged_requests(admin, key_id, expected):
    """The key's request log once `expected` rows are there: the relay
    settles an answer just after it ends."""
    deadline = time.monotonic() + 15
    while True:
        rows = admin("GET", f"/admin/api-keys/{key_id}/usage/logs")["data"]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def test_console_answers_carry_the_strict_policy(relay):
    for path in ("/admin/console", "/admin/console/admin.js", "/api/usage/console", "/api/usage/console/common.js"):
        with urllib.request.urlopen(relay["base"] + path) as response:
            assert response.headers["content-security-policy"] == POLICY, path
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"


def test_the_console_is_behind_the_admin_address_check(binaries, tmp_path):
    with running_relay(binaries, tmp_path, extra_env={"ADMIN_ALLOWED_CIDRS": "10.0.0.0/8"}) as outside:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{outside['base']}/admin/console")
        assert refused.value.code == 403
        # The key holder's page is not an admin route.
        with urllib.request.urlopen(f"{outside['base']}/api/usage/console") as response:
            assert response.status == 200


def test_admin_creates_a_key_sees_its_traffic_and_disables_it(relay, browser):
    driver = browser
    admin = admin_of(relay)
    requested_urls(driver)  # forget what earlier tests loaded
    driver.get(f"{relay['base']}/admin/console")
    wait(driver, seen.visibility_of_element_located((By.ID, "login-password")))
    screenshot(driver, "admin-sign-in")
    sign_in(driver, relay)
    screenshot(driver, "admin-keys-none-yet")

    driver.find_element(By.ID, "key-create").click()
    wait(driver, seen.visibility_of_element_located((By.ID, "f-name"))).send_keys("console alice")
    driver.find_element(By.ID, "f-description").send_keys("made in the browser test")
    driver.find_element(By.ID, "key-save").click()
    secret_node = wait(driver, seen.visibility_of_element_located((By.ID, "secret-value")))
    secret = secret_node.text
    assert secret.startswith("sk-proxy-")
    env = driver.find_element(By.ID, "secret-env").text
    assert f"ANTHROPIC_AUTH_TOKEN={secret}" in env
    assert f"ANTHROPIC_BASE_URL={relay['base']}" in env
    driver.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": relay["base"], "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    driver.find_element(By.ID, "secret-copy").click()
    wait(driver, seen.text_to_be_present_in_element((By.ID, "secret-copied"), "Copied."))
    clipboard = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; navigator.clipboard.readText().then(done, e => done('error: ' + e));")
    assert clipboard == secret
    screenshot(driver, "admin-key-created")
    driver.find_element(By.ID, "secret-close").click()
    assert driver.find_element(By.ID, "secret-value").text == ""

    answer = ask(relay, secret, MODEL_A)
    assert answer.usage.output_tokens == 7
    listed = admin("GET", "/admin/api-keys?limit=100")["data"]
    key_id = next(k["id"] for k in listed if k["name"] == "console alice")
    rows = logged_requests(admin, key_id, 1)
    assert len(rows) == 1
    cost = rows[0]["cost_micro_usd"]
    tokens = sum(rows[0][f] for f in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))

    # Usage, all keys: today's bars carry the request, the key tops the list.
    open_view(driver, "usage")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    bars = driver.find_elements(By.CSS_SELECTOR, f'#usage-body g.bar[data-label="{today}"]')
    # Spend per day, then tokens per day.
    assert [int(b.get_attribute("data-total")) for b in bars] == [cost, tokens]
    assert "console alice" in driver.find_element(By.ID, "usage-body").text
    screenshot(driver, "admin-usage")

    # Drill down: the key's own page and its request log.
    open_view(driver, "keys")
    key_row(driver, "console alice").find_element(By.XPATH, ".//button[text()='Usage']").click()
    wait(driver, seen.text_to_be_present_in_element((By.ID, "key-title"), "console alice"))
    log = wait(driver, seen.visibility_of_element_located((By.CSS_SELECTOR, "#key-log tbody")))
    log_rows = log.find_elements(By.TAG_NAME, "tr")
    assert len(log_rows) == 1
    assert MODEL_A in log_rows[0].text and "200" in log_rows[0].text
    by_model = driver.find_element(By.CSS_SELECTOR, "#key-body .spend-by-model")
    assert by_model.find_element(By.CSS_SELECTOR, f'g.bar[data-label="{today}"]').get_attribute("data-total") == str(cost)
    assert [li.text for li in by_model.find_elements(By.CSS_SELECTOR, ".legend li")] == [MODEL_A]
    # The SDK sends no request class: one row, everything in it.
    classes = driver.find_elements(By.CSS_SELECTOR, "#key-body #request-classes tbody tr")
    assert len(classes) == 1 and classes[0].text.startswith("unclassified")
    screenshot(driver, "admin-key-usage", dark=True)

    for view in ("tiers", "prices", "upstreams"):
        open_view(driver, view)
        screenshot(driver, f"admin-{view}")
    assert "basic" in driver.find_element(By.ID, "view-tiers").get_attribute("textContent")

    # Disable: the page shows it, the relay refuses the key.
    open_view(driver, "keys")
    key_row(driver, "console alice").find_element(By.XPATH, ".//button[text()='Disable']").click()
    wait(driver, lambda d: "disabled" in key_row(d, "console alice").text)
    screenshot(driver, "admin-keys")
    with pytest.raises(anthropic.APIStatusError) as refused:
        ask(relay, secret, MODEL_A)
    assert refused.value.status_code in (401, 403)

    # Sign out drops the token: the API answers nothing without signing in.
    driver.find_element(By.ID, "sign-out").click()
    wait(driver, seen.visibility_of_element_located((By.ID, "login-password")))
    assert driver.find_element(By.ID, "keys-table").text == ""
    assert_only_the_relay_was_asked(driver, relay)


def test_a_key_holder_sees_only_their_own_figures(relay, browser):
    driver = browser
    admin = admin_of(relay)
    requested_urls(driver)
    a = admin("POST", "/admin/api-keys", {"name": "holder A", "dollar_limits": [{"window": "day", "limit_usd": 5}]})
    b = admin("POST", "/admin/api-keys", {"name": "holder B"})
    ask(relay, a["api_key"], MODEL_A)
    ask(relay, b["api_key"], MODEL_B)
    ask(relay, b["api_key"], MODEL_B)
    logged_requests(admin, a["id"], 1)
    logged_requests(admin, b["id"], 2)

    driver.get(f"{relay['base']}/api/usage/console")
    wait(driver, seen.visibility_of_element_located((By.ID, "key-input"))).send_keys(a["api_key"])
    driver.find_element(By.ID, "key-submit").click()
    body = wait(driver, seen.visibility_of_element_located((By.ID, "usage-body")))
    assert driver.find_element(By.ID, "usage-title").text == "Usage of holder A"
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "holder B" not in text and MODEL_B not in text and b["prefix"] not in text
    assert MODEL_A in text
    legend = driver.find_elements(By.CSS_SELECTOR, ".spend-by-model .legend li")
    assert [li.text for li in legend] == [MODEL_A]
    assert len(body.find_elements(By.CSS_SELECTOR, "#request-classes tbody tr")) == 1
    assert len(body.find_elements(By.CSS_SELECTOR, "table tbody tr")) == 2  # the class, the request
    assert "left" in text and "resets" in text  # the day budget, with its reset
    assert "ANTHROPIC_BASE_URL" in driver.find_element(By.ID, "setup-env").text
    # The key is nowhere but in the script's memory.
    assert a["api_key"] not in driver.current_url
    assert driver.execute_script("return window.localStorage.length + window.sessionStorage.length + document.cookie.length") == 0
    screenshot(driver, "holder-usage", dark=True)

    driver.find_element(By.ID, "forget").click()
    wait(driver, seen.visibility_of_element_located((By.ID, "key-input")))
    assert driver.find_element(By.ID, "usage-body").text == ""
    screenshot(driver, "holder-key")
    assert_only_the_relay_was_asked(driver, relay)


def test_a_hostile_key_name_renders_as_text(relay, browser):
    driver = browser
    admin = admin_of(relay)
    requested_urls(driver)
    hostile = admin("POST", "/admin/api-keys", {"name": HOSTILE, "description": "<b>bold?</b>"})
    ask(relay, hostile["api_key"], MODEL_A)
    logged_requests(admin, hostile["id"], 1)

    sign_in(driver, relay)
    row = wait(driver, lambda d: key_row(d, HOSTILE))
    assert row.find_element(By.CSS_SELECTOR, ".key-name").is_displayed()
    open_view(driver, "usage")
    assert HOSTILE in driver.find_element(By.ID, "usage-body").text
    assert driver.find_elements(By.TAG_NAME, "img") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (reading it is the check)

    driver.get(f"{relay['base']}/api/usage/console")
    wait(driver, seen.visibility_of_element_located((By.ID, "key-input"))).send_keys(hostile["api_key"])
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, seen.text_to_be_present_in_element((By.ID, "usage-title"), HOSTILE))
    assert driver.find_elements(By.TAG_NAME, "img") == []
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018
    assert_only_the_relay_was_asked(driver, relay)


def segments(driver, chart, day):
    """A stacked chart's segments of one day's bar, as {series: value}."""
    bar = driver.find_element(By.CSS_SELECTOR, f'{chart} g.bar[data-label="{day}"]')
    return {rect.get_attribute("data-series"): int(rect.get_attribute("data-value"))
            for rect in bar.find_elements(By.TAG_NAME, "rect")}


def test_days_stack_by_model_with_the_apis_figures_and_classes_split_them(relay, browser):
    driver = browser
    admin = admin_of(relay)
    requested_urls(driver)
    key = admin("POST", "/admin/api-keys", {"name": "two models"})
    ask(relay, key["api_key"], MODEL_A)
    ask(relay, key["api_key"], MODEL_B, max_tokens=9)
    client_of(relay, key["api_key"]).messages.create(
        model=MODEL_B, max_tokens=11, messages=[{"role": "user", "content": "a subagent's turn"}],
        extra_headers={"x-claude-code-request-class": "subagent"})
    logged_requests(admin, key["id"], 3)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    day = admin("GET", f"/admin/api-keys/{key['id']}/usage/daily?days=1")["data"][0]
    spend = {m["model"]: m["cost_micro_usd"] for m in day["by_model"]}
    tokens = {m["model"]: m["tokens"] for m in day["by_model"]}
    assert set(spend) == {MODEL_A, MODEL_B} and sum(spend.values()) == day["cost_micro_usd"]
    assert sum(tokens.values()) == day["tokens"]
    classes = {c["request_class"]: c for c in admin("GET", f"/admin/api-keys/{key['id']}/usage/request-classes")["data"]}
    assert set(classes) == {"subagent", "unclassified"}
    assert classes["subagent"]["requests"] == 1 and classes["unclassified"]["requests"] == 2

    # The key's page: each model's segment of today's bar is the API's figure.
    sign_in(driver, relay)
    key_row(driver, "two models").find_element(By.XPATH, ".//button[text()='Usage']").click()
    wait(driver, seen.text_to_be_present_in_element((By.ID, "key-title"), "two models"))
    wait(driver, seen.visibility_of_element_located((By.CSS_SELECTOR, "#key-body .spend-by-model")))
    assert segments(driver, "#key-body .spend-by-model", today) == spend
    assert segments(driver, "#key-body .tokens-by-model", today) == tokens
    legend = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#key-body .spend-by-model .legend li")]
    assert sorted(legend) == sorted([MODEL_A, MODEL_B])
    rows = driver.find_elements(By.CSS_SELECTOR, "#key-body #request-classes tbody tr")
    assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == ["subagents", "unclassified (no class sent)"]
    assert " 1 " in f" {rows[0].find_elements(By.TAG_NAME, 'td')[1].text} "
    screenshot(driver, "admin-key-two-models")

    # All keys: today's bar per model is the sum the API gives across keys.
    open_view(driver, "usage")
    everyone = admin("GET", f"/admin/usage?from={today}&to={today}")["daily"][0]
    assert segments(driver, "#usage-body .spend-by-model", today) == {
        m["model"]: m["cost_micro_usd"] for m in everyone["by_model"] if m["cost_micro_usd"] > 0}
    assert segments(driver, "#usage-body .tokens-by-model", today) == {
        m["model"]: m["tokens"] for m in everyone["by_model"] if m["tokens"] > 0}

    # The holder sees the same split of their own key.
    driver.get(f"{relay['base']}/api/usage/console")
    wait(driver, seen.visibility_of_element_located((By.ID, "key-input"))).send_keys(key["api_key"])
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, seen.visibility_of_element_located((By.CSS_SELECTOR, ".spend-by-model")))
    assert segments(driver, ".spend-by-model", today) == spend
    assert segments(driver, ".tokens-by-model", today) == tokens
    assert "subagents" in driver.find_element(By.ID, "request-classes").text
    assert_only_the_relay_was_asked(driver, relay)


def test_admin_edits_the_model_aliases_and_sees_a_refusal_by_field(binaries, browser, tmp_path):
    driver = browser
    # Aliases read fresh on every request, so the one just saved is used at once.
    with running_relay(binaries, tmp_path, extra_env={"PRICE_CACHE_SECONDS": "0"}) as fresh:
        admin = admin_of(fresh)
        requested_urls(driver)
        sign_in(driver, fresh)
        open_view(driver, "models")
        assert "No alias" in driver.find_element(By.ID, "models-body").text
        driver.find_element(By.ID, "alias-add").click()
        driver.find_element(By.CSS_SELECTOR, "#models-body input.alias-alias").send_keys("claude-team")
        driver.find_element(By.CSS_SELECTOR, "#models-body input.alias-model").send_keys(MODEL_B)
        driver.find_element(By.CSS_SELECTOR, "#models-body input.alias-display_name").send_keys(HOSTILE)
        driver.find_element(By.ID, "alias-save").click()
        wait(driver, seen.text_to_be_present_in_element((By.ID, "models-status"), "Saved 1 alias."))
        stored = admin("GET", "/admin/model-aliases")["aliases"]
        assert stored == [{"alias": "claude-team", "model": MODEL_B, "display_name": HOSTILE}]
        # The display name is an input's value: text, never markup.
        shown = driver.find_element(By.CSS_SELECTOR, "#models-body input.alias-display_name")
        assert shown.get_attribute("value") == HOSTILE
        assert driver.find_elements(By.TAG_NAME, "img") == []

        # An alias naming another alias: the API's 422 is shown, naming the field.
        driver.find_element(By.ID, "alias-add").click()
        driver.find_elements(By.CSS_SELECTOR, "#models-body input.alias-alias")[1].send_keys("claude-loop")
        driver.find_elements(By.CSS_SELECTOR, "#models-body input.alias-model")[1].send_keys("claude-team")
        driver.find_element(By.ID, "alias-save").click()
        status = wait(driver, lambda d: d.find_element(By.ID, "models-status") if "aliases[1].model" in
                      d.find_element(By.ID, "models-status").text else False)
        assert "not an alias" in status.text and "error" in status.get_attribute("class")
        marked = driver.find_elements(By.CSS_SELECTOR, "#models-body input.alias-model")[1]
        assert marked.get_attribute("aria-invalid") == "true"
        assert admin("GET", "/admin/model-aliases")["aliases"] == stored
        screenshot(driver, "admin-models-refused")
        driver.find_elements(By.XPATH, "//div[@id='models-body']//button[text()='Remove']")[1].click()
        driver.find_element(By.ID, "alias-save").click()
        wait(driver, seen.text_to_be_present_in_element((By.ID, "models-status"), "Saved 1 alias."))

        # A request for the alias: the log shows the model and the alias asked for.
        key = admin("POST", "/admin/api-keys", {"name": "alias user"})
        ask(fresh, key["api_key"], "claude-team")
        rows = logged_requests(admin, key["id"], 1)
        assert (rows[0]["model"], rows[0]["requested_model"]) == (MODEL_B, "claude-team")
        open_view(driver, "keys")
        wait(driver, lambda d: key_row(d, "alias user"))
        key_row(driver, "alias user").find_element(By.XPATH, ".//button[text()='Usage']").click()
        log = wait(driver, seen.visibility_of_element_located((By.CSS_SELECTOR, "#key-log tbody")))
        assert f"{MODEL_B} (asked as claude-team)" in log.text
        screenshot(driver, "admin-models-log")
        open_view(driver, "models")
        screenshot(driver, "admin-models")
        assert_only_the_relay_was_asked(driver, fresh)


def test_admin_edits_a_tier_and_sees_the_apis_refusal(relay, browser):
    driver = browser
    admin = admin_of(relay)
    requested_urls(driver)
    sign_in(driver, relay)
    open_view(driver, "tiers")
    # A new tier.
    for field, value in (("t-name", "gold"), ("t-requests", "5000"), ("t-period", "60"), ("t-tpm", "400000")):
        driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, field).send_keys(value)
    driver.find_element(By.ID, "tier-save").click()
    wait(driver, seen.text_to_be_present_in_element((By.ID, "tier-form-status"), "Saved tier gold."))
    gold = next(t for t in admin("GET", "/admin/tiers")["data"] if t["name"] == "gold")
    assert (gold["requests"], gold["period"], gold["tokens_per_minute"]) == (5000, 60, 400000)
    assert "gold" in driver.find_element(By.ID, "tiers-body").text
    # Edit it: the form takes the row, and a refused value shows the API's message.
    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#tiers-body tbody tr") if r.text.startswith("gold"))
    row.find_element(By.XPATH, ".//button[text()='Edit']").click()
    assert driver.find_element(By.ID, "t-requests").get_attribute("value") == "5000"
    driver.find_element(By.ID, "t-period").clear()
    driver.find_element(By.ID, "t-period").send_keys("0")
    driver.find_element(By.ID, "tier-save").click()
    status = wait(driver, lambda d: d.find_element(By.ID, "tier-form-status") if "error" in
                  d.find_element(By.ID, "tier-form-status").get_attribute("class") else False)
    with pytest.raises(urllib.error.HTTPError) as api:
        admin("PUT", "/admin/tiers/gold", {"requests": 5000, "period": 0, "tokens_per_minute": 400000})
    assert api.value.code == 422
    message = json.loads(api.value.read())["error"]["message"]
    assert status.text == message
    gold = next(t for t in admin("GET", "/admin/tiers")["data"] if t["name"] == "gold")
    assert gold["period"] == 60
    screenshot(driver, "admin-tiers-edit")
    assert_only_the_relay_was_asked(driver, relay)
