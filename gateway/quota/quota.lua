-- The quota script: admission, settlement, renewal and usage for one API key, atomic, on
-- Redis's own clock. gateway/quota/memory.py is its in-process twin; the contract tests in
-- tests/contract/test_quota_store.py hold the two to the same behaviour.
-- KEYS (all share the key's hash tag, so one cluster slot):
--   1 record (hash), 2 usage (hash: day img month tok), 3 leases (zset lease -> expiry ms),
--   4 reservations (hash lease -> "day:n"), 5 expired leases (zset lease -> when it expired),
--   6 requests (zset lease -> admission ms: the last 60 s of admissions, while rpm is set)
-- ARGV[1] = 'admit': 2 key hash, 3 model, 4 n, 5 lease id, 6 lease ttl ms
-- ARGV[1] = 'settle': 2 lease id, 3 answered (1/0), 4 images to count, 5 tokens to count
-- ARGV[1] = 'renew': 2 lease ttl ms, 3... lease ids (those still live get a full ttl again)
-- ARGV[1] = 'extend': 2 lease id, 3 extra images
-- ARGV[1] = 'usage'
-- admit, extend and usage return {status, retry_ms, rpm, req_used, req_reset_ms, ipd, img_used,
--   day_reset_ms, tpm, tok_used, month_reset_ms, in_flight}
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end



local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / 86400000)
local y, m = civil_from_days(day)
local month = y * 12 + m - 1
-- Reservations must outlive a quiet key until its day's counter is gone with the day.
local keep_ms = 2 * 86400000
-- How long an expired lease is remembered: far longer than a settle is retried (see
-- admission.QuotaTicket), so a late settle still finds out whether to count its answer.
local expired_keep_ms = 86400000

if ARGV[1] == 'renew' then
  local expiry = now + tonumber(ARGV[2])
  local renewed = 0
  for i = 3, #ARGV do
    renewed = renewed + redis.call('ZADD', KEYS[3], 'XX', 'CH', expiry, ARGV[i])
  end
  return renewed
end

local u = redis.call('HMGET', KEYS[2], 'day', 'img', 'month', 'tok')
local img = (tonumber(u[1]) == day) and (tonumber(u[2]) or 0) or 0
local tok = (tonumber(u[3]) == month) and (tonumber(u[4]) or 0) or 0

-- Drop a lease and its reservation: whether it was held, and the images it held today (a
-- reservation from an earlier day was charged to that day's counter, now gone).
local function release(lease)
  local found, held, today = false, 0, true
  local r = redis.call('HGET', KEYS[4], lease)
  if r then
    found = true
    local rday, rn = string.match(r, '^(%d+):(%d+)$')
    if tonumber(rday) == day then held = tonumber(rn) else today = false end
    redis.call('HDEL', KEYS[4], lease)
  end
  redis.call('ZREM', KEYS[3], lease)
  return found, held, today
end

local function save()
  redis.call('HSET', KEYS[2], 'day', day, 'img', img, 'month', month, 'tok', tok)
  redis.call('PEXPIRE', KEYS[2], 40 * 86400000)
end

if ARGV[1] == 'settle' then
  local found, held, today = release(ARGV[2])
  img = img - held
  local expired = redis.call('ZREM', KEYS[5], ARGV[2]) == 1
  -- A lease found nowhere was settled already: this is a retry whose first reply was lost,
  -- and counting it again would double-charge. Settling is idempotent.
  if ARGV[3] == '1' and (found or expired) then
    -- Count the answer's images today, unless its reservation was charged to an earlier day;
    -- a lease that expired meanwhile gave its images back, so they are counted again here.
    if expired or today then img = img + tonumber(ARGV[4]) end
    tok = tok + tonumber(ARGV[5])
  end
  save()
  return 1
end

-- Leases never settled (an instance died, a reply was lost) give their reservation back, and
-- are remembered as expired for a settle that comes late.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, lease in ipairs(expired) do
  local _, held = release(lease)
  img = img - held
  redis.call('ZADD', KEYS[5], now, lease)
end
if #expired > 0 then
  save()
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - expired_keep_ms)
  redis.call('PEXPIRE', KEYS[5], expired_keep_ms)
end

local rec = redis.call('HMGET', KEYS[1], 'hash', 'status', 'models', 'rpm', 'images_per_day',
  'tokens_per_month', 'max_concurrent')
local rpm, ipd, tpm, conc = tonumber(rec[4]) or 0, tonumber(rec[5]) or 0, tonumber(rec[6]) or 0,
  tonumber(rec[7]) or 0
local day_reset = (day + 1) * 86400000 - now
local ny, nm = y, m + 1
if nm > 12 then ny, nm = y + 1, 1 end
local month_reset = days_from_civil(ny, nm, 1) * 86400000 - now

-- Requests per minute: an exact sliding window of the admissions of the last 60 s, trimmed
-- here, so a changed rpm applies to the very next request. Returns how many are in the window
-- and the ms until its remaining next grows: until the oldest admission leaves it, or with
-- more than rpm inside (rpm was lowered), until enough have left for one more to pass.
local window_ms = 60000
if rpm > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now - window_ms) end
local function requests()
  if rpm == 0 then return 0, 0 end
  local used = redis.call('ZCARD', KEYS[6])
  if used == 0 then return 0, 0 end
  local at = redis.call('ZRANGE', KEYS[6], math.max(0, used - rpm), math.max(0, used - rpm),
    'WITHSCORES')
  return used, tonumber(at[2]) + window_ms - now
end

local function answer(status, retry)
  local used, reset = requests()
  return {status, retry, rpm, used, reset, ipd, img, day_reset, tpm, tok, month_reset,
          redis.call('ZCARD', KEYS[3])}
end

if ARGV[1] == 'usage' then return answer('ok', 0) end

if ARGV[1] == 'extend' then
  -- More images for a live lease: checked and charged like admission's, or nothing changes.
  local r = redis.call('HGET', KEYS[4], ARGV[2])
  if not r then return answer('unknown_key', 0) end
  local rday, rn = string.match(r, '^(%d+):(%d+)$')
  local extra = tonumber(ARGV[3])
  if tonumber(rday) == day then
    if ipd > 0 and img + extra > ipd then return answer('images', day_reset) end
    img = img + extra
    save()
  end  -- else reserved on a day now over: its count is gone, nothing to check or charge
  redis.call('HSET', KEYS[4], ARGV[2], rday .. ':' .. (tonumber(rn) + extra))
  return answer('ok', 0)
end

if rec[1] ~= ARGV[2] or rec[2] ~= 'active' then return answer('unknown_key', 0) end
local models = rec[3] or ''
if models ~= '' and not string.find(models, ',' .. ARGV[3] .. ',', 1, true) then
  return answer('model', 0)
end
local n = tonumber(ARGV[4])

if conc > 0 and redis.call('ZCARD', KEYS[3]) >= conc then return answer('concurrency', 1000) end
if rpm > 0 then
  local used, reset = requests()
  if used >= rpm then return answer('rpm', reset) end
end
if ipd > 0 and img + n > ipd then return answer('images', day_reset) end
if tpm > 0 and tok >= tpm then return answer('tokens', month_reset) end

img = img + n
save()
if rpm > 0 then
  redis.call('ZADD', KEYS[6], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[6], window_ms)
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
redis.call('HSET', KEYS[4], ARGV[5], day .. ':' .. n)
redis.call('PEXPIRE', KEYS[3], keep_ms + tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[4], keep_ms + tonumber(ARGV[6]))
return answer('ok', 0)
