-- bans: demerits become IP bans; banned client IPs and sender domains are refused (stock pack).
--
-- Connect: a client IP banned in the store is refused ("Banned for dictionary attacks"), held
-- until DATA when [site] delay_reject is on, except on exempt_ports ({daemon_port}: 587).
-- RCPT: a recipient the MTA refused itself ({rcpt_mailer} = "error": unknown user) costs
-- bad_rcpt_demerits. Whenever this policy runs (RCPT, MAIL, abort, close) and the connection's
-- demerits (ctx:demerit, raised by any policy) exceed max_demerits, the client IP is banned for
-- ban_ttl; trusted relays, internal and localhost clients never are. A ban takes effect from the
-- next connection.
-- MAIL: a sender domain banned in the store or in a domain_files list is refused. Domains get
-- banned by the admin (luamilter db ban domain), and by the spf and keywords policies through
-- lib/domain_ban.
local milter = require "milter"
local store = require "milter.store"
local site = require "milter.site"
local net = require "milter.net"
local replies = require "lib.replies"

local fill = milter.fill

-- Banned-domain list files, read once per Lua state (a reload reads them again): path → set.
local domain_files = {}

local function file_domains(path)
  local set = domain_files[path]
  if set then return set end
  set = {}
  local entries, err = site.read_list(path)
  if not entries then
    milter.log.error("bans: cannot read domain list", path, err)
  else
    for _, entry in ipairs(entries) do set[entry:lower()] = true end
  end
  domain_files[path] = set
  return set
end

-- The list entries that ban `domain`: itself, then "*." and each parent while two labels
-- remain (a.b.example.com: *.b.example.com, *.example.com, *.com), as the store matches.
local function ban_candidates(domain)
  local out = { domain }
  local rest = domain:gsub("^%*%.", "")
  while true do
    local parent = rest:match("^[^.]*%.(.+)$")
    if not parent then return out end
    out[#out + 1] = "*." .. parent
    rest = parent
  end
end

local function file_ban(domain, paths)
  if #paths == 0 then return nil end
  local candidates = ban_candidates(domain)
  for _, path in ipairs(paths) do
    local set = file_domains(path)
    for _, c in ipairs(candidates) do
      if set[c] then return c end
    end
  end
  return nil
end

-- Bans the client IP once its demerits exceed the limit.
local function ban_offender(ctx, opts)
  local client = ctx.client
  if ctx.vars.banned or ctx.demerits <= opts.max_demerits or client.ip == nil
    or client.trusted or client.internal or client.localhost then
    return
  end
  local reason = ctx.demerits .. " demerits"
  local ttl = opts.ban_ttl > 0 and opts.ban_ttl or nil    -- 0: no expiry
  local ok, err = store.ban("ip", client.ip, reason, ttl)
  if ok then
    ctx.vars.banned = true
    milter.log.info("banned IP", client.ip, reason)
  else
    milter.log.warn("cannot ban IP", client.ip, err)
  end
end

local function exempt_port(ctx, ports)
  local port = tonumber(ctx:macro("daemon_port") or "")
  for _, p in ipairs(ports) do
    if p == port then return true end
  end
  return false
end

local function refuse(text)
  return milter.reject{ code = 550, xcode = "5.7.1", text = text }
end

return {
  description = "turn demerits into IP bans; refuse banned client IPs and sender domains",
  needs = { "rejected_recipients" },
  macros = { connect = { "{daemon_port}" }, rcpt = { "{rcpt_mailer}" } },
  options = {
    max_demerits = 3,
    ban_ttl = milter.duration "7d",
    bad_rcpt_demerits = 1,
    exempt_ports = { 587 },
    ip_reply = "Banned for dictionary attacks",
    domain_reply = "We have banned {domain} for email abuse.",
    domain_files = {},
  },

  connect = function(ctx, hostname, ip, opts)
    if ip == nil or exempt_port(ctx, opts.exempt_ports) then return end
    local ban, err = store.banned("ip", ip)
    if ban then
      return refuse(opts.ip_reply)
    elseif err then
      milter.log.debug("cannot check the IP ban list", ip, err)
    end
  end,

  mail = function(ctx, sender, args, opts)
    ban_offender(ctx, opts)
    local _, domain = net.split(sender)
    if not domain or domain == "" then return end
    local entry = file_ban(domain, opts.domain_files)
    if not entry then
      local ban, err = store.banned("domain", domain)
      if err then milter.log.debug("cannot check the domain ban list", domain, err) end
      entry = ban and ban.entry
    end
    if entry then
      milter.log.debug("banned domain", domain, "by", entry)
      return refuse(replies.lines("bandom", { { "domain", domain } },
        fill(opts.domain_reply, { domain = domain })))
    end
  end,

  rcpt = function(ctx, rcpt, args, opts)
    if ctx:macro("rcpt_mailer") == "error" then
      ctx:demerit(opts.bad_rcpt_demerits, "bad recipient " .. rcpt)
    end
    ban_offender(ctx, opts)
  end,

  abort = function(ctx, opts) ban_offender(ctx, opts) end,
  close = function(ctx, opts) ban_offender(ctx, opts) end,
}
