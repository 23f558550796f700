-- bucket.lua: a fleet-wide token bucket (RUNCOMFY_MAX_SUBMITS_PER_S), on Redis TIME.
--
-- KEYS[1]  bucket hash         rcw:bucket           tokens, ts
-- ARGV[1]  rate                tokens per second
-- ARGV[2]  burst               most tokens kept (at least 1)
--
-- Returns 0 when a token was taken, else the milliseconds until one will be there.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or ARGV[2])
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or now)
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens >= 1 then
  redis.call('HSET', KEYS[1], 'tokens', tokens - 1, 'ts', now)
  redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
  return 0
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return math.ceil((1 - tokens) / rate * 1000)
