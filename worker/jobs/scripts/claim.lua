-- claim.lua: bind an idempotency key to a job and its request, atomically.
--
-- KEYS[1]  idempotency key     rcw:idem:<idempotency_key>
-- ARGV[1]  binding             "<job id>|<request hash>" to store if the key is free
-- ARGV[2]  ttl seconds         how long the binding lives (JOB_TTL_S)
--
-- Returns the binding the key holds after the call: ARGV[1] when it was free, else the
-- earlier one (the caller compares request hashes: same request, same job; else conflict).
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
