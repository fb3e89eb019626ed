// Drives the gateway's ops page in Debian's headless Chromium with playwright-core (no browser
// download). Run by gateway/tests/ops_page.rs; prints one `OPS-PAGE-RESULT {json}` line and
// exits 0 when every step passed, 1 with `OPS-PAGE-FAILED <reason>` otherwise.
//
// Environment: OPS_BASE_URL, OPS_ADMIN_USER, OPS_ADMIN_PASSWORD, OPS_PLAYER_USER,
// OPS_PLAYER_PASSWORD, OPS_PARTITIONS, OPS_SCREENSHOT (path of the PNG), CHROMIUM_PATH
// (default /usr/bin/chromium).

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";

// Every wait is bounded; the Rust test also kills this script after its own deadline.
const STEP_TIMEOUT_MS = 20_000;
const LAUNCH_TIMEOUT_MS = 30_000;

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

const baseUrl = required("OPS_BASE_URL").replace(/\/$/, "");
const admin = { user: required("OPS_ADMIN_USER"), password: required("OPS_ADMIN_PASSWORD") };
const player = { user: required("OPS_PLAYER_USER"), password: required("OPS_PLAYER_PASSWORD") };
const partitions = Number(required("OPS_PARTITIONS"));
const screenshot = required("OPS_SCREENSHOT");
const executablePath = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

// The flags this machine needs: no sandbox as root, and no background connections (the
// network is closed; without these Chromium keeps trying to reach Google's hosts).
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const step = (name) => console.log(`step: ${name}`);

async function login(page, who) {
  await page.fill("#username", who.user);
  await page.fill("#password", who.password);
  await page.click("#login-button");
}

async function textOf(page, selector) {
  return (await page.locator(selector).first().innerText()).trim();
}

async function main() {
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: LAUNCH_TIMEOUT_MS,
  });
  const problems = [];
  const foreignRequests = [];
  let page = null;
  try {
    const context = await browser.newContext({ viewport: { width: 1360, height: 900 } });
    page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
    page.on("console", (message) => {
      // The refused login and the player's 403 are expected; the browser logs them as errors.
      const expected = /^Failed to load resource: the server responded with a status of 40[13]\b/;
      if (message.type() === "error" && !expected.test(message.text())) {
        problems.push(`console error: ${message.text()}`);
      }
    });
    page.on("request", (request) => {
      const url = request.url();
      if (!url.startsWith(baseUrl + "/") && !url.startsWith("data:")) foreignRequests.push(url);
    });

    step("open the page");
    const response = await page.goto(`${baseUrl}/ops`);
    if (!response || response.status() !== 200) throw new Error(`GET /ops answered ${response && response.status()}`);
    await page.waitForSelector("#login-form", { state: "visible" });

    step("a player who is not an admin is told so");
    await login(page, player);
    await page.waitForSelector("#admin-only", { state: "visible" });
    const adminOnly = await textOf(page, "#admin-only");
    if (!/admin/i.test(adminOnly)) throw new Error(`no admin-only message: ${adminOnly}`);
    if (await page.locator("#dashboard").isVisible()) throw new Error("the dashboard is shown to a player");
    await page.click("#admin-only-back");
    await page.waitForSelector("#login-form", { state: "visible" });

    step("a wrong password is refused");
    await login(page, { user: admin.user, password: admin.password + "-wrong" });
    await page.waitForSelector("#login-error", { state: "visible" });

    step("the admin logs in");
    await login(page, admin);
    await page.waitForSelector("#dashboard", { state: "visible" });

    step("partitions and their owners");
    await page.waitForFunction(
      (expected) => document.querySelectorAll("#partitions-table tbody tr").length === expected,
      partitions,
    );
    await page.waitForFunction(() =>
      [...document.querySelectorAll("#partitions-table tbody tr td:nth-child(2)")]
        .every((cell) => cell.textContent.trim() && cell.textContent.trim() !== "unowned"));
    const owners = await page.$$eval("#partitions-table tbody tr td:nth-child(2)",
      (cells) => [...new Set(cells.map((cell) => cell.textContent.trim()))]);

    step("queue depths");
    await page.waitForFunction(() =>
      [...document.querySelectorAll("#partitions-table td.queued")]
        .every((cell) => /^[0-9,]+$/.test(cell.textContent.trim())));
    await page.waitForSelector('#queues-table tr[data-queue="treasury"]');
    await page.waitForSelector('#queues-table tr[data-queue="dead_letters"]');
    const queued = await page.$$eval("#partitions-table td.queued", (cells) => cells.map((cell) => cell.textContent.trim()));

    step("treasury balance and lag");
    await page.waitForFunction(() => /^[0-9,]+$/.test(document.querySelector("#treasury-balance").textContent.trim()));
    await page.waitForFunction(() => /^(none|[0-9.]+ (ms|s|min))$/.test(document.querySelector("#treasury-lag").textContent.trim()));
    const treasuryBalance = await textOf(page, "#treasury-balance");
    const treasuryLag = `${await textOf(page, "#treasury-lag")} (${await textOf(page, "#treasury-lag-detail")})`;
    await page.waitForFunction(() => document.querySelectorAll("#hot-accounts-table tbody tr").length >= 2);

    step("the last audit");
    await page.waitForFunction(() => /PASSED|FAILED/.test(document.querySelector("#audit-result").textContent));
    const audit = await textOf(page, "#audit-result");
    const auditChecks = await page.$$eval("#audit-table tbody tr[data-check]", (rows) =>
      rows.map((row) => ({ check: row.dataset.check, result: row.children[1].textContent.trim() })));
    if (auditChecks.length === 0) throw new Error("no audit checks are listed");

    step("commands per second and latency (the test keeps some load going)");
    await page.waitForFunction(() => {
      const rate = Number(document.querySelector("#commands-per-second").textContent.replace(/,/g, ""));
      return Number.isFinite(rate) && rate > 0;
    });
    await page.waitForFunction(() => /^p50 [0-9.]+ ms$/.test(document.querySelector("#latency-p50").textContent.trim()));
    const commandsPerSecond = await textOf(page, "#commands-per-second");
    const latency = `${await textOf(page, "#latency-p50")} (${await textOf(page, "#latency-detail")})`;

    step("replay a dead letter");
    const row = page.locator("#dead-letters-table tbody tr:has(button.replay)").first();
    await row.waitFor({ state: "visible" });
    const deadLetterId = Number(await row.getAttribute("data-dead-letter"));
    const replayButton = page.locator(`#dead-letters-table tr[data-dead-letter="${deadLetterId}"] button.replay`);
    const deadLettersBefore = await textOf(page, "#dead-letter-count");
    await replayButton.click();
    await page.waitForFunction(
      (id) => {
        const status = document.querySelector(`#dead-letters-table tr[data-dead-letter="${id}"] .status`);
        return status && /replayed/.test(status.textContent) && !status.querySelector("button");
      },
      deadLetterId,
    );
    const replayedStatus = await textOf(page, `#dead-letters-table tr[data-dead-letter="${deadLetterId}"] .status`);

    step("screenshot");
    // Let one more poll render, so the picture shows the state after the replay settled.
    await page.waitForTimeout(2_500);
    mkdirSync(dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot, fullPage: true });

    if (foreignRequests.length > 0) throw new Error(`requests outside the gateway: ${foreignRequests.join(", ")}`);
    if (problems.length > 0) throw new Error(problems.join("; "));
    console.log("OPS-PAGE-RESULT " + JSON.stringify({
      partitionRows: partitions, owners, queued, treasuryBalance, treasuryLag, audit, auditChecks,
      commandsPerSecond, latency, deadLettersBefore, replayedDeadLetter: deadLetterId, replayedStatus,
      screenshot,
    }));
  } catch (error) {
    // What the page showed when it failed, next to where the screenshot would have been.
    if (page) {
      const failed = screenshot.replace(/\.png$/, "") + "-failed.png";
      mkdirSync(dirname(failed), { recursive: true });
      await page.screenshot({ path: failed, fullPage: true }).catch(() => {});
      console.log(`screenshot of the failure: ${failed}`);
    }
    throw error;
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    console.log(`OPS-PAGE-FAILED ${error && error.stack ? error.stack : error}`);
    process.exit(1);
  },
);
