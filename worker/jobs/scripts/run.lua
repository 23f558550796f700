-- run.lua: read a job for one run of a step, and count that run, in one round trip. The
-- count tells a step whether an earlier run of it (another delivery, a retry, a rerun) may
-- have done part of its work already (the archive step: whether an S3 copy may exist).
--
-- KEYS[1]  job hash            rcw:job:<id>
-- ARGV[1]  counter field       runs:<task>
--
-- Returns {} when there is no job (nothing is written, so no hash without a TTL is left
-- behind), else {TIME seconds, TIME microseconds, runs counted so far (this one included),
-- {field, value, …}}. The counter is a hash field of its own: writes (update.lua, check.lua)
-- set other fields and never reset it.
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
local runs = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local t = redis.call('TIME')
return {t[1], t[2], runs, redis.call('HGETALL', KEYS[1])}
