// Enqueue a runcomfy-worker job from Node.js with nothing but Redis: no Celery client.
//
// The worker consumes Celery protocol 2 messages with a JSON body from the Redis list
// "runcomfy.submit"; kombu's Redis transport stores each message as one JSON envelope,
// LPUSHed onto the list. buildMessage() returns that envelope field for field (see
// examples/python_raw_producer.py and the README, "Producing from other languages").
//
//   npm install
//   REDIS_URL=redis://localhost:6379/0 WEBHOOK_URL=https://example.com/hook \
//     node index.mjs "a lighthouse at dusk"
//
// Prints the job id; follow it with `runcomfy-worker wait <id>`.

import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { pathToFileURL } from "node:url";

export const QUEUE = "runcomfy.submit"; // the Redis list the worker reads
export const TASK = "runcomfy.submit"; // the Celery task name

/** The kombu/Redis envelope of runcomfy.submit(jobId, request), Celery protocol 2. */
export function buildMessage(jobId, request, options = {}) {
  const taskId = options.taskId ?? randomUUID();
  const origin = options.origin ?? `node-producer@${hostname()}`;
  const args = [jobId, request];
  const kwargs = {};
  const embed = { callbacks: null, errbacks: null, chain: null, chord: null };
  const body = JSON.stringify([args, kwargs, embed]);
  return {
    body: Buffer.from(body, "utf8").toString("base64"),
    "content-encoding": "utf-8",
    "content-type": "application/json",
    headers: {
      lang: "py", // Celery only accepts protocol 2 messages that say so
      task: TASK,
      id: taskId,
      shadow: null,
      eta: null,
      expires: null,
      group: null,
      group_index: null,
      retries: 0,
      timelimit: [null, null],
      root_id: taskId,
      parent_id: null,
      argsrepr: JSON.stringify(args),
      kwargsrepr: JSON.stringify(kwargs),
      origin,
      ignore_result: null,
      replaced_task_nesting: 0,
      stamped_headers: null,
      stamps: {},
    },
    properties: {
      correlation_id: taskId,
      reply_to: randomUUID(),
      delivery_mode: 2, // persistent
      delivery_info: { exchange: "", routing_key: QUEUE },
      priority: 0,
      body_encoding: "base64",
      delivery_tag: randomUUID(),
    },
  };
}

/** Push one submit message with a node-redis client; resolves to the job id. */
export async function enqueue(client, request, jobId = randomUUID().replaceAll("-", "")) {
  await client.lPush(QUEUE, JSON.stringify(buildMessage(jobId, request)));
  return jobId;
}

async function main() {
  const { createClient } = await import("redis"); // only needed when actually sending
  const prompt = process.argv[2] ?? "a lighthouse at dusk, oil on canvas";
  const request = {
    input: {
      prompt,
      "width\u00d7height": process.env.SIZE ?? "2048x2048(1:1)", // "size" works too
      scale: 0.5,
      force_single: true,
    },
    metadata: { source: "node-producer" },
  };
  if (process.env.WEBHOOK_URL) request.webhook_url = process.env.WEBHOOK_URL;
  const client = createClient({ url: process.env.REDIS_URL ?? "redis://localhost:6379/0" });
  await client.connect();
  try {
    console.log(await enqueue(client, request));
  } finally {
    await client.quit();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err) => {
    console.error(`error: ${err.message}`);
    process.exit(1);
  });
}
