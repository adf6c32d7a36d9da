-- The quota script: admission and settlement for one API key, atomic, on Redis's own clock.
-- KEYS (all share the key's hash tag, so one cluster slot):
--   1 record (hash), 2 usage (hash: tat day img month tok), 3 leases (zset lease -> expiry ms),
--   4 reservations (hash lease -> "day:n")
-- ARGV[1] = 'admit': 2 key hash, 3 model, 4 n, 5 lease id, 6 lease ttl ms, 7 rpm burst seconds
--   returns {status, retry_ms, rpm, req_remaining, req_reset_ms, ipd, img_used, day_reset_ms,
--            tpm, tok_used, month_reset_ms}
-- ARGV[1] = 'settle': 2 lease id, 3 answered (1/0), 4 images to count, 5 tokens to count
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

local u = redis.call('HMGET', KEYS[2], 'tat', 'day', 'img', 'month', 'tok')
local tat = tonumber(u[1]) or 0
local img = (tonumber(u[2]) == day) and (tonumber(u[3]) or 0) or 0
local tok = (tonumber(u[4]) == month) and (tonumber(u[5]) or 0) or 0

-- Take a lease's reservation back; returns the images it held today.
local function release(lease)
  local held = 0
  local r = redis.call('HGET', KEYS[4], lease)
  if r then
    local rday, rn = string.match(r, '^(%d+):(%d+)$')
    if tonumber(rday) == day then held = tonumber(rn) end
    redis.call('HDEL', KEYS[4], lease)
  end
  redis.call('ZREM', KEYS[3], lease)
  return held
end

local function save()
  redis.call('HSET', KEYS[2], 'tat', tat, 'day', day, 'img', img, 'month', month, 'tok', tok)
  redis.call('PEXPIRE', KEYS[2], 40 * 86400000)
end

if ARGV[1] == 'settle' then
  img = img - release(ARGV[2])
  if ARGV[3] == '1' then
    img = img + tonumber(ARGV[4])
    tok = tok + tonumber(ARGV[5])
  end
  save()
  return 1
end

local rec = redis.call('HMGET', KEYS[1], 'hash', 'status', 'models', 'rpm', 'images_per_day',
  'tokens_per_month', 'max_concurrent')
if rec[1] ~= ARGV[2] or rec[2] ~= 'active' then return {'unknown_key', 0} end
local models = rec[3] or ''
if models ~= '' and not string.find(models, ',' .. ARGV[3] .. ',', 1, true) then
  return {'model', 0}
end
local rpm, ipd, tpm, conc = tonumber(rec[4]) or 0, tonumber(rec[5]) or 0, tonumber(rec[6]) or 0,
  tonumber(rec[7]) or 0
local n = tonumber(ARGV[4])
local day_reset = (day + 1) * 86400000 - now
local ny, nm = y, m + 1
if nm > 12 then ny, nm = y + 1, 1 end
local month_reset = days_from_civil(ny, nm, 1) * 86400000 - now

-- Leases never settled (an instance died, a reply was lost) give their reservation back.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, lease in ipairs(expired) do img = img - release(lease) end

if conc > 0 and redis.call('ZCARD', KEYS[3]) >= conc then
  if #expired > 0 then save() end
  return {'concurrency', 1000}
end
local new_tat = tat
local req_remaining, req_reset = 0, 0
if rpm > 0 then
  local interval = 60000 / rpm
  local burst = math.max(1, math.floor(rpm * tonumber(ARGV[7]) / 60 + 0.5))
  local tau = (burst - 1) * interval
  local base = math.max(tat, now)
  local allow_at = base - tau
  if now < allow_at then
    if #expired > 0 then save() end
    return {'rpm', math.ceil(allow_at - now), rpm, 0, math.ceil(allow_at - now)}
  end
  new_tat = math.ceil(base + interval)
  req_remaining = math.max(0, math.floor((now + tau - new_tat) / interval) + 1)
  req_reset = math.max(0, new_tat - now)
end
if ipd > 0 and img + n > ipd then
  if #expired > 0 then save() end
  return {'images', day_reset, rpm, 0, 0, ipd, img, day_reset}
end
if tpm > 0 and tok >= tpm then
  if #expired > 0 then save() end
  return {'tokens', month_reset, rpm, 0, 0, ipd, img, day_reset, tpm, tok, month_reset}
end

tat = new_tat
img = img + n
save()
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[5])
redis.call('HSET', KEYS[4], ARGV[5], day .. ':' .. n)
redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[4], 2 * tonumber(ARGV[6]))
return {'ok', 0, rpm, req_remaining, req_reset, ipd, img, day_reset, tpm, tok, month_reset}
