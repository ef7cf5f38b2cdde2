"""Drives the playground in headless Chromium: the page loads from the gateway alone and carries its icon, a
prompt submitted shows streamed text and ends `succeeded` with the live queue counting it out, a refused
submission replaces the last job's status and text with the refusal, a JSON Schema in its box makes the text
valid JSON of that schema, a long job is cancelled with the button, /docs renders.

Usage: python playground.py BASE_URL SCREENSHOT_DIR

The browser is Debian's (/usr/bin/chromium, or $CHROMIUM), driven by Playwright for Python from PyPI, whose
wheel carries its own driver: nothing is fetched from a browser vendor or from npm. Exits non-zero naming the
failed check.
"""

import json
import os
import re
import sys

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright


def fail(what):
    print(f"FAILED: {what}", file=sys.stderr)
    sys.exit(1)


def wait_for(page, script, timeout_ms, what):
    # As a function: Playwright polls an expression with eval, which the page's content security policy
    # forbids (no 'unsafe-eval'), while a function is called without it.
    try:
        page.wait_for_function(f"() => ({script})", timeout=timeout_ms)
    except PlaywrightTimeout:
        fail(what())


def main():
    base, shots = sys.argv[1], sys.argv[2]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
            args=["--no-sandbox", "--disable-gpu"],
        )
        try:
            run(browser.new_page(viewport={"width": 1280, "height": 860}), base, shots)
        finally:
            browser.close()
    print("playground checks passed")


def run(page, base, shots):
    foreign, errors, missing = [], [], []
    page.on("request", lambda r: None if r.url.startswith(base) else foreign.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    # The browser's own requests (a /favicon.ico when the page names no icon) raise no request event; a
    # resource it could not load shows as a console error that names it.
    page.on("console", lambda m: missing.append(m.location.get("url", "?"))
            if m.type == "error" and "status of 404" in m.text else None)
    status = lambda: page.text_content("#status")  # noqa: E731

    page.goto(base + "/", wait_until="load")
    if page.title() != "GPT-J playground":
        fail("the playground's title")
    wait_for(page, "document.getElementById('consumers').textContent === '1'", 15000,
             lambda: "the live queue shows one worker")

    # A prompt submitted shows text as it streams, then the finished job.
    page.fill("#prompt", "Once upon a time, in a land far away")
    page.select_option("#strategy", "greedy")
    page.fill("#max_new_tokens", "300")
    page.click("#submit")
    wait_for(page, "document.getElementById('output').textContent.length > 0", 30000,
             lambda: "streamed text appears")
    wait_for(page, "document.getElementById('status').textContent === 'succeeded'", 60000,
             lambda: f"the job ends succeeded, status: {status()}")
    output = page.text_content("#output")
    if not output.startswith("Once upon a time, in a land far away") or len(output) <= 40:
        fail(f"the text: {output}")
    if not re.search(r"\d+ tokens", page.text_content("#detail")):
        fail("the details give the token count")
    if page.locator("#history tr").count() < 1:
        fail("the job is in this browser's history")
    # The header's queue figures are read again when the job ends, not at the next 2 s tick.
    wait_for(page, "document.getElementById('running').textContent === '0'", 1000,
             lambda: f"the live queue counts the ended job out, running: {page.text_content('#running')}")
    page.screenshot(path=f"{shots}/playground-succeeded.png", full_page=True)

    # A refused submission (its prompt and max new tokens overflow the model's context: 422) shows the refusal
    # in place of the last job's status, text and details.
    page.fill("#max_new_tokens", "2048")
    page.fill("#prompt", "Too long for the context")
    page.click("#submit")
    wait_for(page, "document.getElementById('status').textContent.startsWith('refused')", 10000,
             lambda: f"the refusal replaces the last job's status, status: {status()}")
    if "context_overflow" not in page.text_content("#error"):
        fail(f"the refusal names its reason: {page.text_content('#error')}")
    if page.text_content("#output") or page.text_content("#detail"):
        fail(f"the last job's text is gone: {page.text_content('#output')!r} {page.text_content('#detail')!r}")
    page.screenshot(path=f"{shots}/playground-refused.png", full_page=True)

    # A JSON Schema in its box: the text is JSON valid against it (the random model writes noise otherwise).
    prompt = "A person as JSON:"
    page.fill("#prompt", prompt)
    page.fill("#max_new_tokens", "200")
    page.fill("#schema", json.dumps({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "age"], "additionalProperties": False}))
    page.click("#submit")
    wait_for(page, "document.getElementById('status').textContent === 'succeeded'", 60000,
             lambda: f"the constrained job ends succeeded, status: {status()}")
    answer = page.text_content("#output")[len(prompt):]
    try:
        person = json.loads(answer)
    except ValueError:
        fail(f"the constrained output is JSON: {answer!r}")
    if sorted(person) != ["age", "name"] or not 0 <= person["age"] <= 99 or len(person["name"]) > 12:
        fail(f"the constrained output follows its schema: {person}")
    page.screenshot(path=f"{shots}/playground-schema.png", full_page=True)
    # A schema that is not JSON is refused in the page, before anything is sent.
    page.fill("#schema", "{not json")
    page.click("#submit")
    wait_for(page, "document.getElementById('status').textContent.startsWith('refused')", 5000,
             lambda: f"a broken schema is refused, status: {status()}")
    if "not JSON" not in page.text_content("#error"):
        fail(f"the refusal says the schema is not JSON: {page.text_content('#error')}")
    page.fill("#schema", "")

    # A long job, cancelled with the button while it streams.
    page.fill("#max_new_tokens", "2000")
    page.fill("#prompt", "A story that never ends")
    page.click("#submit")
    wait_for(page, "/^running/.test(document.getElementById('status').textContent)"
                   " && document.getElementById('output').textContent.length > 0", 30000,
             lambda: "the long job runs and streams")
    page.click("#cancel")
    wait_for(page, "document.getElementById('status').textContent === 'cancelled'", 15000,
             lambda: f"cancel works, status: {status()}")
    page.screenshot(path=f"{shots}/playground-cancelled.png", full_page=True)

    # The API reference renders from the gateway alone too.
    page.goto(base + "/docs/", wait_until="networkidle")
    try:
        page.wait_for_selector(".swagger-ui .info .title", timeout=15000)
    except PlaywrightTimeout:
        fail("/docs renders")
    if "GPT-J gateway" not in page.text_content(".swagger-ui .info .title"):
        fail("/docs shows our API")
    page.screenshot(path=f"{shots}/docs.png")

    if foreign:
        fail(f"a page fetched from another host: {', '.join(foreign)}")
    if missing:
        fail(f"the browser was answered 404 for: {', '.join(missing)}")
    if errors:
        fail(f"script errors: {'; '.join(errors)}")


if __name__ == "__main__":
    main()
