-- admit.lua: hand free RunComfy slots to waiting jobs, fairly. One call, atomic.
--
-- Order: priorities by weighted round-robin (ARGV[5], e.g. "8,2,1": of 11 admissions while
-- all three wait, 8 go to high, 2 to normal, 1 to low, so low is never starved); within a
-- priority, tenants by round-robin (one job per tenant per turn), skipping tenants at
-- their own cap. Job ids in a queue that are no longer in the waiting hash (cancelled while
-- waiting) are dropped. Keys of tenant queues are derived inside the script from the
-- round-robin lists ("rcw:wait:<priority>:<tenant>", "rcw:slots:t:<tenant>"): one Redis
-- only, no Cluster (see deploy/README.md).
--
-- KEYS[1]  waiting hash        rcw:waiting
-- KEYS[2]  slots zset          rcw:slots            member job id, score admission time
-- KEYS[3]  pause key           rcw:pause            exists: submissions paused, admit none
-- KEYS[4]  probing key         rcw:pause:probing    exists: admit one job at most, and only
--                                                   while no slot is in use (half-open)
-- KEYS[5]  credits hash        rcw:wrr              weighted round-robin credits
-- ARGV[1]  max concurrency     slots in total, or -1 for no limit
-- ARGV[2]  tenant max          slots per tenant, or -1 for no limit
-- ARGV[3]  at most             admit at most this many in this call
-- ARGV[4]  now                 score for the slots zsets (epoch seconds)
-- ARGV[5]  weights             "high,normal,low" credits, e.g. "8,2,1"
--
-- Returns a flat list: job id, tenant, job id, tenant … of the jobs admitted.
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
local prios = {'high', 'normal', 'low'}
local waiting = 0
for _, p in ipairs(prios) do waiting = waiting + redis.call('LLEN', 'rcw:rr:' .. p) end
if waiting == 0 then return {} end  -- nothing waits: touch nothing
local weights = {}
for w in string.gmatch(ARGV[5], '[^,]+') do table.insert(weights, tonumber(w)) end
local limit = tonumber(ARGV[3])
local used = redis.call('ZCARD', KEYS[2])
if redis.call('EXISTS', KEYS[4]) == 1 then
  if used > 0 then return {} end
  limit = math.min(limit, 1)
end
local free = limit
if tonumber(ARGV[1]) >= 0 then free = math.min(limit, tonumber(ARGV[1]) - used) end
local tenant_max = tonumber(ARGV[2])
local out = {}
local exhausted = {}

local function credit(p) return tonumber(redis.call('HGET', KEYS[5], p) or '0') end

local function take_from(p)
  local rr = 'rcw:rr:' .. p
  local n = redis.call('LLEN', rr)
  for _ = 1, n do
    local tenant = redis.call('LMOVE', rr, rr, 'LEFT', 'RIGHT')
    if not tenant then return nil end
    local tslots = 'rcw:slots:t:' .. tenant
    if tenant_max < 0 or redis.call('ZCARD', tslots) < tenant_max then
      local queue = 'rcw:wait:' .. p .. ':' .. tenant
      while true do
        local job = redis.call('LPOP', queue)
        if not job then break end
        if redis.call('HDEL', KEYS[1], job) == 1 then
          if redis.call('LLEN', queue) == 0 then redis.call('LREM', rr, 0, tenant) end
          redis.call('ZADD', KEYS[2], ARGV[4], job)
          redis.call('ZADD', tslots, ARGV[4], job)
          return {job, tenant}
        end
      end
      redis.call('LREM', rr, 0, tenant)  -- only cancelled jobs were left
    end
  end
  return nil
end

while free > 0 do
  local chosen = nil
  for round = 1, 2 do
    for i, p in ipairs(prios) do
      if not exhausted[p] and redis.call('LLEN', 'rcw:rr:' .. p) > 0 and credit(p) > 0 then
        chosen = p
        break
      end
    end
    if chosen then break end
    -- nobody with credit waits: a new round of credits
    for i, p in ipairs(prios) do redis.call('HSET', KEYS[5], p, weights[i] or 1) end
  end
  if not chosen then break end
  local got = take_from(chosen)
  if got then
    redis.call('HINCRBY', KEYS[5], chosen, -1)
    table.insert(out, got[1])
    table.insert(out, got[2])
    free = free - 1
  else
    exhausted[chosen] = true  -- every tenant waiting at this priority is at its cap
  end
end
return out
