// Drives the playground in headless Chromium: one forced run in partial
// mode, then "rerun in the other mode"; prints what the timelines show as
// JSON and leaves screenshots in the output folder.
//   node playground.mjs BASE_URL FORCED_JSON OUT_DIR [TOKEN]
// With TOKEN, the page must first show the API's refusal, then work once
// the token is typed in.
import { chromium } from "playwright-core";

const [base, forced, out, token] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${base}/ui`);
  let refused = "";
  if (token) {
    await page.waitForFunction(() => document.getElementById("error").textContent.includes("401"));
    refused = await page.textContent("#error");
    await page.fill("#token", token);
    await page.dispatchEvent("#token", "change");
  }
  await page.waitForSelector(".tool");
  await page.click("summary");
  await page.fill("#forced", forced);
  await page.selectOption("#mode", "partial");
  await page.click("#run");
  await page.waitForSelector(".run[data-done='1']", { timeout: 120000 });
  await page.screenshot({ path: `${out}/partial.png` });
  await page.click("#rerun");
  await page.waitForFunction(
    () => document.querySelectorAll(".run[data-done='1']").length === 2, null, { timeout: 120000 });
  await page.screenshot({ path: `${out}/both.png`, fullPage: true });
  const runs = await page.evaluate(() => [...document.querySelectorAll(".run")].map((run) => {
    const box = (b) => b.getBoundingClientRect();
    const decode = [...run.querySelectorAll(".decode")].map(box);
    const units = [...run.querySelectorAll(".unit")].map(box);
    return {
      mode: run.dataset.mode,
      text: run.querySelector(".text").textContent,
      summary: run.querySelector(".summary").textContent,
      units: units.length,
      // units whose bar starts inside a decode bar: sent while decoding
      overlapping: units.filter((u) => decode.some((d) => u.left >= d.left && u.left < d.right)).length,
    };
  }));
  const tools = await page.$$eval(".tool", (t) => t.length);
  console.log(JSON.stringify({ runs, errors, tools, refused }));
} finally {
  await browser.close();
}
