// Socket.IO sessions through a URL, for tests/socketio.rs.
//
//   node client.js URL [--sessions N] [--concurrency C] [--origin O]
//                      [--transports polling,websocket] [--wait-ms MS]
//
// Each session is a new client (its own engine.io connection and cookie jar,
// as a fresh browser would be) with the default transports: long-polling
// first, then the upgrade to WebSocket. A session:
//   1. waits for `connect` (within --wait-ms);
//   2. emits `echo` and checks the ack (normally still over polling);
//   3. waits for the engine's upgrade to WebSocket (within --wait-ms; an
//      `upgradeError` fails it at once);
//   4. emits `echo` again and checks the ack came over WebSocket;
//   5. disconnects.
// The server names its instance in every ack and event, so each session
// reports the instances it met while polling and after the upgrade.
//
// Prints one JSON object on stdout:
//   {ok, failed, upgraded, errors: [..], sessions: [{connected, upgraded,
//    instances_polling, instances_ws, error}]}
// `ok` counts sessions where every step above worked.
"use strict";

const { parseArgs } = require("node:util");
const { io } = require("socket.io-client");

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    sessions: { type: "string", default: "50" },
    concurrency: { type: "string", default: "10" },
    origin: { type: "string" },
    transports: { type: "string", default: "polling,websocket" },
    "wait-ms": { type: "string", default: "5000" },
  },
});
const url = positionals[0];
if (!url) {
  console.error("usage: node client.js URL [--sessions N] [--concurrency C] [--origin O]");
  process.exit(2);
}
const sessions = Number(values.sessions);
const concurrency = Math.max(1, Number(values.concurrency));
const waitMs = Number(values["wait-ms"]);
const transports = values.transports.split(",");

// Resolves when one of `events` ([emitter, name] pairs) is emitted; rejects
// on one of `failures` (named in the error) or after `ms`.
function waitFor(events, failures, ms, label) {
  return new Promise((resolve, reject) => {
    const handlers = [];
    const done = (fn) => {
      clearTimeout(timer);
      for (const [emitter, name, handler] of handlers) {
        emitter.off(name, handler);
      }
      fn();
    };
    const timer = setTimeout(
      () => done(() => reject(new Error(`${label}: none within ${ms} ms`))),
      ms,
    );
    for (const [emitter, name] of events) {
      const handler = () => done(resolve);
      handlers.push([emitter, name, handler]);
      emitter.on(name, handler);
    }
    for (const [emitter, name] of failures) {
      const handler = (...args) => done(() => reject(describe(name, args)));
      handlers.push([emitter, name, handler]);
      emitter.on(name, handler);
    }
  });
}

// An Error naming the event, the transport error and the HTTP status and
// body when the failure was an HTTP answer (engine.io's TransportError keeps
// the status as `description` and the XHR as `context`).
function describe(event, args) {
  const parts = [event];
  for (const arg of args) {
    if (arg === undefined || arg === null) {
      continue;
    }
    if (typeof arg === "string") {
      parts.push(arg);
      continue;
    }
    if (arg.message) {
      parts.push(arg.message);
    }
    if (typeof arg.description === "number") {
      parts.push(String(arg.description));
    } else if (arg.description && arg.description.message) {
      parts.push(arg.description.message);
    }
    const body = arg.context && arg.context.responseText;
    if (typeof body === "string" && body.length > 0) {
      parts.push(body.slice(0, 200));
    }
  }
  return new Error(parts.join(": "));
}

// Emits `echo` and checks the ack; `why` tells why the socket was lost,
// when it was.
async function echo(socket, payload, why) {
  let answer;
  try {
    answer = await socket.timeout(waitMs).emitWithAck("echo", payload);
  } catch (error) {
    // "socket has been disconnected": say why it was.
    throw why() || error;
  }
  if (answer.payload !== payload) {
    throw new Error(`echo: sent ${JSON.stringify(payload)}, got ${JSON.stringify(answer)}`);
  }
  return answer;
}

async function session(index) {
  const record = {
    connected: false,
    upgraded: false,
    instances_polling: [],
    instances_ws: [],
    error: null,
  };
  const seen = (transport, instance) => {
    const list = transport === "websocket" ? record.instances_ws : record.instances_polling;
    if (!list.includes(instance)) {
      list.push(instance);
    }
  };
  const options = {
    forceNew: true,
    reconnection: false,
    timeout: waitMs,
    transports,
    // In Node this gives the engine.io client a cookie jar: cookies set on
    // polling responses go back on later polls and on the upgrade request.
    withCredentials: true,
  };
  if (values.origin) {
    // Sent on the polling requests and on the WebSocket upgrade alike.
    options.extraHeaders = { Origin: values.origin };
  }
  const socket = io(url, options);
  socket.on("hello", (event) => seen(event.transport, event.instance));
  socket.on("upgraded", (event) => seen("websocket", event.instance));
  let lost = null;
  socket.on("disconnect", (reason, details) => {
    lost = describe("disconnect", [reason, details]);
  });
  // The engine probes WebSocket as soon as its handshake is answered, often
  // before `connect`: listen from the start so the outcome is never missed
  // (the wait for it is bounded from here, by 3 × --wait-ms).
  const engine = socket.io.engine;
  const upgraded = waitFor(
    [[engine, "upgrade"]],
    [
      [engine, "upgradeError"],
      [socket, "disconnect"],
    ],
    3 * waitMs,
    "upgrade",
  );
  // Awaited below, or never when an earlier step fails.
  upgraded.catch(() => {});
  try {
    await waitFor([[socket, "connect"]], [[socket, "connect_error"]], waitMs, "connect");
    record.connected = true;

    const before = await echo(socket, `session ${index} before upgrade`, () => lost);
    seen(before.transport, before.instance);

    if (engine.transport.name !== "websocket") {
      await upgraded;
    }
    record.upgraded = engine.transport.name === "websocket";

    const after = await echo(socket, `session ${index} after upgrade`, () => lost);
    seen(after.transport, after.instance);
    if (after.transport !== "websocket") {
      throw new Error(`echo after upgrade came over ${after.transport}`);
    }
  } catch (error) {
    record.error = error.message;
  } finally {
    socket.disconnect();
  }
  return record;
}

async function main() {
  const records = new Array(sessions);
  let next = 0;
  const worker = async () => {
    while (next < sessions) {
      const index = next++;
      records[index] = await session(index);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, sessions) }, worker));
  const errors = records.filter((r) => r.error !== null).map((r) => r.error);
  const summary = {
    ok: records.filter((r) => r.error === null).length,
    failed: errors.length,
    upgraded: records.filter((r) => r.upgraded).length,
    errors,
    sessions: records,
  };
  process.stdout.write(JSON.stringify(summary) + "\n");
}

// The whole run is bounded: a session cannot take longer than its waits, but
// a bug here must not hang the test either.
const deadline = setTimeout(
  () => {
    console.error("client.js: whole run exceeded its deadline");
    process.exit(3);
  },
  (4 * waitMs + 2000) * Math.ceil(sessions / concurrency),
);
main().then(
  () => {
    clearTimeout(deadline);
    process.exit(0);
  },
  (error) => {
    console.error(`client.js: ${error.stack || error}`);
    process.exit(1);
  },
);
