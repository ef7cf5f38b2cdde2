// Drives the playground in headless Chromium: the page loads from the gateway alone, a prompt submitted
// shows streamed text and ends `succeeded`, a long job is cancelled with the button. Usage:
//   node playground.mjs BASE_URL SCREENSHOT_DIR
// Exits non-zero naming the failed check. The browser is Debian's (/usr/bin/chromium, or $CHROMIUM).
import { chromium } from "playwright-core";

const [base, shots] = process.argv.slice(2);
const fail = (what) => { console.error(`FAILED: ${what}`); process.exit(1); };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const foreign = [];
  page.on("request", (r) => { if (!r.url().startsWith(base)) foreign.push(r.url()); });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  await page.goto(base + "/", { waitUntil: "load" });
  if ((await page.title()) !== "GPT-J playground") fail("the playground's title");
  await page.waitForFunction(() => document.getElementById("consumers").textContent === "1", null, { timeout: 15000 })
    .catch(() => fail("the live queue shows one worker"));

  // A prompt submitted shows text as it streams, then the finished job.
  await page.fill("#prompt", "Once upon a time, in a land far away");
  await page.selectOption("#strategy", "greedy");
  await page.fill("#max_new_tokens", "300");
  await page.click("#submit");
  await page.waitForFunction(() => document.getElementById("output").textContent.length > 0, null, { timeout: 30000 })
    .catch(() => fail("streamed text appears"));
  await page.waitForFunction(() => document.getElementById("status").textContent === "succeeded", null, { timeout: 60000 })
    .catch(async () => fail("the job ends succeeded, status: " + (await page.textContent("#status"))));
  const output = await page.textContent("#output");
  if (!output.startsWith("Once upon a time, in a land far away") || output.length <= 40) fail(`the text: ${output}`);
  if (!/\d+ tokens/.test(await page.textContent("#detail"))) fail("the details give the token count");
  if ((await page.locator("#history tr").count()) < 1) fail("the job is in this browser's history");
  await page.screenshot({ path: `${shots}/playground-succeeded.png`, fullPage: true });

  // A long job, cancelled with the button while it streams.
  await page.fill("#max_new_tokens", "2000");
  await page.fill("#prompt", "A story that never ends");
  await page.click("#submit");
  await page.waitForFunction(() => /^running/.test(document.getElementById("status").textContent)
    && document.getElementById("output").textContent.length > 0, null, { timeout: 30000 })
    .catch(() => fail("the long job runs and streams"));
  await page.click("#cancel");
  await page.waitForFunction(() => document.getElementById("status").textContent === "cancelled", null, { timeout: 15000 })
    .catch(async () => fail("cancel works, status: " + (await page.textContent("#status"))));
  await page.screenshot({ path: `${shots}/playground-cancelled.png`, fullPage: true });

  // The API reference renders from the gateway alone too.
  await page.goto(base + "/docs/", { waitUntil: "networkidle" });
  await page.waitForSelector(".swagger-ui .info .title", { timeout: 15000 }).catch(() => fail("/docs renders"));
  if (!(await page.textContent(".swagger-ui .info .title")).includes("GPT-J gateway")) fail("/docs shows our API");
  await page.screenshot({ path: `${shots}/docs.png` });

  if (foreign.length) fail(`a page fetched from another host: ${foreign.join(", ")}`);
  if (errors.length) fail(`script errors: ${errors.join("; ")}`);
  console.log("playground checks passed");
} finally {
  await browser.close();
}
