-- dnsbl: DNS block- and allowlists (stock pack).
--
-- At MAIL, for clients that are not internal, trusted, authenticated or localhost, one batch of
-- lookups run side by side (dns.lists): the client IP in every `dnswl` and `dnsbl` zone, the
-- MAIL FROM domain and the HELO name in the `rhsbl` zones that check them. A DNSWL listing
-- whitelists the message: published as ctx.msg.dnswl, no other check of this policy runs.
-- Otherwise each counted listing acts as its zone says (reject, tempfail, or tag with a
-- header); the strongest wins. At end of headers the From header's domains go through the
-- `rhsbl` zones that check "from". A lookup that fails (timeout, SERVFAIL) never rejects; a
-- zone with on_error = "tempfail" answers 451 instead of letting the message through.
local milter = require "milter"
local dns = require "milter.dns"
local net = require "milter.net"

local MAX_QUERIES = 64 -- what one dns.lists call takes
local MAX_FROM_DOMAINS = 5
local RANK = { tag = 1, tempfail = 2, reject = 3 }
local FIELDS = {
  dnswl = { zone = true, answers = true, mask = true },
  dnsbl = { zone = true, answers = true, mask = true, action = true, reply = true, on_error = true },
  rhsbl = { zone = true, answers = true, mask = true, action = true, reply = true, on_error = true,
            check = true },
}
local CHECKS = { sender = true, helo = true, from = true }

local fill = milter.fill

-- Text from DNS goes into replies and headers: no control characters, bounded length.
local function clean(text)
  return (text:gsub("%c", " "):sub(1, 400))
end

-- The 4 octets of an IPv4 address string, or nil.
local function octets(ip)
  local a, b, c, d = ip:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if a then return { tonumber(a), tonumber(b), tonumber(c), tonumber(d) } end
end

-- One octet of an answer pattern: "2", "[2..11]", "[1;3;5..7]" (Postfix's filter syntax).
local function octet_set(spec, fail)
  local set = {}
  local inner = spec:match("^%[(.*)%]$") or spec
  for item in (inner .. ";"):gmatch("([^;]*);") do
    local lo, hi = item:match("^(%d+)%.%.(%d+)$")
    if not lo then lo = item:match("^(%d+)$"); hi = lo end
    lo, hi = tonumber(lo), tonumber(hi)
    if not lo or lo > 255 or hi > 255 or lo > hi then fail() end
    for n = lo, hi do set[n] = true end
  end
  return set
end

-- A predicate on answer addresses from one `answers` item: an address, a CIDR, or a pattern.
local function answer_matcher(text, where)
  local function fail()
    error(("%s: bad answer %q (use an address, a CIDR, or a pattern like 127.0.0.[2..11])")
      :format(where, tostring(text)), 0)
  end
  if type(text) ~= "string" then fail() end
  if text:find("/", 1, true) then
    local ok, set = pcall(net.ipset, { text })
    if not ok then fail() end
    return function(code) return set:contains(code) end
  end
  local sets, pos = {}, 1
  while true do
    local piece, after = text:match("^(%d+)()", pos)
    if not piece then piece, after = text:match("^(%[[^%]]*%])()", pos) end
    if not piece then fail() end
    sets[#sets + 1] = octet_set(piece, fail)
    if after > #text then break end
    if text:sub(after, after) ~= "." then fail() end
    pos = after + 1
  end
  if #sets ~= 4 then fail() end
  return function(code)
    local o = octets(code)
    return o ~= nil and sets[1][o[1]] and sets[2][o[2]] and sets[3][o[3]] and sets[4][o[4]] or false
  end
end

-- Without `answers`: anything in 127.0.0.0/8 but 127.255.255.0/24, the error answers some
-- lists give (e.g. to queries through public resolvers).
local function default_answer(code)
  local o = octets(code)
  return o ~= nil and o[1] == 127 and not (o[2] == 255 and o[3] == 255)
end

local function compile_zone(kind, index, entry, opts)
  local where = ("[policy.dnsbl] %s item %d"):format(kind, index)
  local function fail(message) error(where .. ": " .. message, 0) end
  if type(entry) ~= "table" then fail('expected a table like { zone = "list.example.org" }') end
  for key in pairs(entry) do
    if not FIELDS[kind][key] then fail(("unknown key %q"):format(tostring(key))) end
  end
  if type(entry.zone) ~= "string" or entry.zone == "" then fail("zone must be a non-empty string") end
  if entry.action ~= nil and type(entry.action) ~= "string" then fail("action must be a string") end
  local zone = {
    kind = kind,
    zone = entry.zone:lower():gsub("%.$", ""),
    action = (entry.action or "reject"):lower(),
    reply = entry.reply or (kind == "rhsbl" and opts.rhsbl_reply or opts.dnsbl_reply),
    on_error = entry.on_error or opts.on_error,
    check = {},
  }
  if not RANK[zone.action] then fail(("unknown action %q (use reject, tempfail or tag)"):format(zone.action)) end
  if type(zone.reply) ~= "string" then fail("reply must be a string") end
  if zone.on_error ~= "continue" and zone.on_error ~= "tempfail" then
    fail(("on_error must be \"continue\" or \"tempfail\", got %q"):format(tostring(zone.on_error)))
  end
  local matchers = {}
  if entry.answers ~= nil then
    if type(entry.answers) ~= "table" then fail("answers must be a list") end
    for i, text in ipairs(entry.answers) do
      matchers[#matchers + 1] = answer_matcher(text, ("%s answers item %d"):format(where, i))
    end
  end
  local mask = entry.mask
  if mask ~= nil and (math.type(mask) ~= "integer" or mask < 1 or mask > 255) then
    fail("mask must be an integer from 1 to 255 (bits of the answer's last octet)")
  end
  function zone.counts(code)
    if mask and (octets(code) or { 0, 0, 0, 0 })[4] & mask == 0 then return false end
    if #matchers == 0 then return default_answer(code) end
    for _, matches in ipairs(matchers) do
      if matches(code) then return true end
    end
    return false
  end
  for _, what in ipairs(entry.check or { "sender" }) do
    if not CHECKS[what] then fail(("unknown check %q (use sender, helo, from)"):format(tostring(what))) end
    zone.check[what] = true
  end
  return zone
end

local compiled = setmetatable({}, { __mode = "k" })

-- The zones of an options table, checked once per Lua state.
local function zones_of(opts)
  local conf = compiled[opts]
  if conf then return conf end
  if opts.on_error ~= "continue" and opts.on_error ~= "tempfail" then
    error(("[policy.dnsbl] on_error must be \"continue\" or \"tempfail\", got %q"):format(opts.on_error), 0)
  end
  conf = { dnswl = {}, dnsbl = {}, rhsbl = {}, from = {} }
  local problems = {}
  for _, kind in ipairs{ "dnswl", "dnsbl", "rhsbl" } do
    for i, entry in ipairs(opts[kind]) do
      local ok, zone = pcall(compile_zone, kind, i, entry, opts)
      if not ok then
        problems[#problems + 1] = tostring(zone)
      else
        table.insert(conf[kind], zone)
        if zone.check.from then table.insert(conf.from, zone) end
      end
    end
  end
  if #problems > 0 then error(table.concat(problems, "; "), 0) end
  if #conf.dnswl + #conf.dnsbl + 2 * #conf.rhsbl > MAX_QUERIES then
    error(("[policy.dnsbl] too many zones: one message may ask at most %d questions"):format(MAX_QUERIES), 0)
  end
  compiled[opts] = conf
  return conf
end

local function skipped(client)
  return client.ip == nil or client.internal or client.trusted or client.authenticated
    or client.localhost
end

-- The HELO name when it is a domain worth looking up (not an address literal or a bare word).
local function helo_domain(helo)
  if not helo then return nil end
  local name = helo:lower():gsub("%.$", "")
  if name:find(".", 1, true) and name:match("^[%w.-]+$") and not name:match("^[%d.]+$") then
    return name
  end
end

-- The domains of the addresses in a From header value.
local function from_domains(value)
  local addresses = {}
  for inner in (value or ""):gmatch("<([^>]*)>") do addresses[#addresses + 1] = inner end
  if #addresses == 0 then
    for part in (value or ""):gsub("%b()", " "):gmatch("[^,]+") do
      addresses[#addresses + 1] = part:match("^%s*(.-)%s*$")
    end
  end
  local seen, domains = {}, {}
  for _, address in ipairs(addresses) do
    local _, domain = net.split(address)
    if domain and domain:find(".", 1, true) and domain:match("^[%w.-]+$") and not seen[domain]
        and #domains < MAX_FROM_DOMAINS then
      seen[domain] = true
      domains[#domains + 1] = domain
    end
  end
  return domains
end

-- A batch of questions: `ask` adds one, `answers` runs them all at once.
local function batch()
  local self = { queries = {}, targets = {} }
  function self.ask(zone, what, name)
    if #self.queries >= MAX_QUERIES then return end
    local query = { zone = zone.zone }
    if zone.kind == "rhsbl" then query.domain = name else query.ip = name end
    table.insert(self.queries, query)
    table.insert(self.targets, { zone = zone, what = what, name = name })
  end
  function self.answers()
    if #self.queries == 0 then return {} end
    return dns.lists(self.queries)
  end
  return self
end

local function counted_codes(zone, answer)
  if not answer.listed then return nil end
  local codes = {}
  for _, code in ipairs(answer.codes) do
    if zone.counts(code) then codes[#codes + 1] = code end
  end
  if #codes > 0 then return codes end
end

local function refusal(hit, opts)
  local lines = { fill(hit.reply, {
    ip = hit.what == "client" and hit.name or nil,
    domain = hit.what ~= "client" and hit.name or nil,
    name = hit.name, zone = hit.zone, what = hit.what,
    codes = table.concat(hit.codes, ", "), reason = hit.reason and clean(hit.reason),
  }) }
  if opts.show_reason and hit.reason and hit.reason ~= "" then lines[2] = clean(hit.reason) end
  if hit.action == "reject" then
    return milter.reject{ code = 550, xcode = "5.7.1", text = lines }
  end
  return milter.tempfail{ code = 451, xcode = "4.7.1", text = lines }
end

-- Acts on the answers of a batch: records and tags every counted listing, then refuses by the
-- strongest action, or tempfails for a failed lookup of an on_error = "tempfail" zone.
local function decide(ctx, opts, questions, answers)
  local hits = ctx.msg.dnsbl or {}
  ctx.msg.dnsbl = hits
  local strongest, failed
  for i, target in ipairs(questions.targets) do
    local zone, answer = target.zone, answers[i]
    if answer.error then
      milter.log.warn("dnsbl:", target.name, "in", zone.zone, "failed:", answer.error)
      if zone.on_error == "tempfail" and not failed then failed = target end
    else
      local codes = counted_codes(zone, answer)
      if codes then
        local hit = { zone = zone.zone, list = zone.kind, what = target.what, name = target.name,
                      codes = codes, reason = answer.reason, action = zone.action, reply = zone.reply }
        table.insert(hits, hit)
        milter.log.debug("dnsbl:", target.what, target.name, "listed in", zone.zone,
                        table.concat(codes, ","), "action", zone.action)
        if zone.action == "tag" then
          local value = ("%s: %s %s listed (%s)"):format(zone.zone, target.what, target.name,
                                                           table.concat(codes, ", "))
          if hit.reason and hit.reason ~= "" then value = value .. ": " .. clean(hit.reason) end
          ctx:add_header(opts.tag_header, value)
        elseif not strongest or RANK[zone.action] > RANK[strongest.action] then
          strongest = hit
        end
      end
    end
  end
  if strongest then return refusal(strongest, opts) end
  if failed then
    return milter.tempfail{ code = 451, xcode = "4.7.1",
      text = fill(opts.error_reply, { name = failed.name, zone = failed.zone.zone, what = failed.what }) }
  end
end

return {
  description = "client IP, sender, HELO and From domains against DNS block- and allowlists",
  options = {
    dnsbl = {},
    rhsbl = {},
    dnswl = {},
    on_error = "continue",
    show_reason = true,
    tag_header = "X-DNSBL",
    dnsbl_reply = "Rejected: {ip} listed at {zone}",
    rhsbl_reply = "Mail from {domain} refused by blackhole site {zone}",
    error_reply = "Temporary lookup failure of {name} at {zone}",
  },

  -- Bad zone entries are load errors: `luamilter check` reports them, a reload refuses them.
  setup = function(opts) zones_of(opts) end,

  mail = function(ctx, sender, args, opts)
    local conf = zones_of(opts)
    local client = ctx.client
    if skipped(client) then return end
    local questions = batch()
    for _, zone in ipairs(conf.dnswl) do questions.ask(zone, "client", client.ip) end
    for _, zone in ipairs(conf.dnsbl) do questions.ask(zone, "client", client.ip) end
    local _, sender_domain = net.split(sender)
    local helo = helo_domain(ctx.helo)
    for _, zone in ipairs(conf.rhsbl) do
      if zone.check.sender and sender_domain and sender_domain ~= "" then
        questions.ask(zone, "sender", sender_domain)
      end
      if zone.check.helo and helo then questions.ask(zone, "helo", helo) end
    end
    local answers = questions.answers()
    for i, target in ipairs(questions.targets) do
      if target.zone.kind == "dnswl" then
        local codes = counted_codes(target.zone, answers[i])
        if codes then
          ctx.msg.dnswl = { zone = target.zone.zone, codes = codes, reason = answers[i].reason }
          milter.log.debug("dnsbl: client", client.ip, "whitelisted by", target.zone.zone)
          return
        end
      end
    end
    return decide(ctx, opts, questions, answers)
  end,

  eoh = function(ctx, opts)
    local conf = zones_of(opts)
    if #conf.from == 0 or ctx.msg.dnswl or skipped(ctx.client) then return end
    local questions = batch()
    for _, domain in ipairs(from_domains(ctx:header("From"))) do
      for _, zone in ipairs(conf.from) do questions.ask(zone, "from", domain) end
    end
    return decide(ctx, opts, questions, questions.answers())
  end,
}
