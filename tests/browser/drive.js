// Drives Debian's Chromium for tests/browser.rs: for each scenario it loads
// a page, optionally has the page fetch another URL first, then has the page
// open a WebSocket, and reports what the page and the browser saw.
//
//   node drive.js '{"userDataDir": "...", "launchMs": 15000, "waitMs": 5000, "scenarios": [
//     {"name": "...", "page": "https://...", "warmup": "https://..." (optional),
//      "socket": "wss://..." (optional), "message": "..."}]}'
//
// Prints exactly one JSON line on stdout: {"browser": VERSION, "results": [...]}.
// Chromium's start is bounded by launchMs and every later wait by waitMs,
// so a hang in the browser shows up as a result, not as a test that never
// ends. Certificate trust comes from the NSS
// database under $HOME, which the test sets up: no certificate error is
// ignored here.
'use strict';

const { chromium } = require('playwright-core');

const CHROMIUM = process.env.WSGATE_CHROMIUM || '/usr/bin/chromium';

// DevTools sees the handshake as Chromium built it. Over HTTP/1.1 Chromium
// makes a Sec-WebSocket-Key; an RFC 8441 stream has none (and its answer is
// 200, not 101), so the key tells, from the browser's side, which one it was.
function watchHandshakes(cdp) {
  const handshakes = [];
  cdp.on('Network.webSocketWillSendHandshakeRequest', (event) => {
    const names = Object.keys(event.request.headers).map((name) => name.toLowerCase());
    handshakes.push({
      requestId: event.requestId,
      keySent: names.includes('sec-websocket-key'),
      origin: event.request.headers.Origin || null,
      responseStatus: null,
    });
  });
  cdp.on('Network.webSocketHandshakeResponseReceived', (event) => {
    const handshake = handshakes.find((h) => h.requestId === event.requestId);
    if (handshake) handshake.responseStatus = event.response.status;
  });
  return handshakes;
}

async function runScenario(context, scenario, waitMs) {
  const page = await context.newPage();
  const console = [];
  page.on('console', (message) => console.push(`${message.type()}: ${message.text()}`));
  const cdp = await context.newCDPSession(page);
  await cdp.send('Network.enable');
  const handshakes = watchHandshakes(cdp);
  const result = { name: scenario.name, console, handshakes };
  try {
    const response = await page.goto(scenario.page, { timeout: waitMs, waitUntil: 'load' });
    result.pageStatus = response ? response.status() : null;
    result.nextHopProtocol = await page.evaluate(
      () => performance.getEntriesByType('navigation')[0].nextHopProtocol,
    );
    if (scenario.warmup) {
      result.warmup = await page.evaluate(
        ([url, ms]) => window.fetchFrom(url, ms),
        [scenario.warmup, waitMs],
      );
    }
    if (scenario.socket) {
      // The page's own script opens the socket, so its Origin is the page's.
      result.socket = await page.evaluate(
        ([url, message, ms]) => window.echoThrough(url, message, ms),
        [scenario.socket, scenario.message, waitMs],
      );
    }
  } catch (error) {
    // Playwright's first line is the browser's error; its call log follows.
    result.failure = String((error && error.message) || error).split('\n')[0];
  } finally {
    await cdp.detach().catch(() => {});
    await page.close();
  }
  for (const handshake of handshakes) delete handshake.requestId;
  return result;
}

async function main() {
  const input = JSON.parse(process.argv[2]);
  const context = await chromium.launchPersistentContext(input.userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    timeout: input.launchMs,
    args: [
      // Root in CI has no user-namespace sandbox to give Chromium.
      '--no-sandbox',
      '--disable-gpu',
      // QUIC would go around wsgate's TCP listeners.
      '--disable-quic',
      '--no-proxy-server',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  try {
    const results = [];
    for (const scenario of input.scenarios) {
      results.push(await runScenario(context, scenario, input.waitMs));
    }
    const browser = context.browser();
    process.stdout.write(
      JSON.stringify({ browser: browser ? browser.version() : null, results }) + '\n',
    );
  } finally {
    await context.close();
  }
}

main().catch((error) => {
  process.stderr.write(`drive.js: ${(error && error.stack) || error}\n`);
  process.exit(1);
});
