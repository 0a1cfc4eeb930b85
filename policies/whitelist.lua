-- whitelist: the auto-whitelist and the blacklist (stock pack).
--
-- EOM: mail from an internal or authenticated client whose MAIL FROM matches whitelist_senders
-- ("user@example.org", or "@example.org" for everyone there) whitelists each recipient outside
-- [site] internal_domains for whitelist_ttl (60 days; sending again renews it), unless the
-- message is an autoreply (subject, User-Agent/X-Mailer, Auto-Submitted, Precedence, X-Autoreply
-- and X-Autorespond markers).
-- MAIL: the sender is looked up by address, then by domain. Whitelisted with SPF pass
-- (ctx.msg.spf) or from a trusted relay: ctx.msg.listed = "WHITELIST" (the entry is renewed);
-- whitelisted otherwise: "PROBATION". Blacklisted (external clients): "BLACKLIST", demerits and
-- 550 5.7.1 "Sender email local blacklist" (held until DATA with [site] delay_reject). A
-- blacklisted bounce (ctx.msg.bounce, from the srs policy) is judged per recipient instead: a
-- recipient whose signed return path the srs policy verified (ctx.msg.signed[rcpt]) is let
-- through, any other refused.
-- Entries added with `luamilter db whitelist|blacklist add` have no expiry unless given one.
local milter = require "milter"
local store = require "milter.store"
local site = require "milter.site"
local net = require "milter.net"
local mime = require "milter.mime"
local domain_ban = require "lib.domain_ban"


local function starts_with_any(text, prefixes)
  for _, p in ipairs(prefixes) do
    if p ~= "" and text:sub(1, #p) == p:lower() then return p end
  end
  return nil
end

local function trimmed_lower(value)
  return ((value or ""):gsub("^%s+", ""):lower())
end

-- Why the message looks like an automatic reply (a text for the log), or nil.
local function autoreply(ctx, opts)
  local subject = trimmed_lower(mime.decode(ctx:header("Subject") or ""))
  local hit = starts_with_any(subject, opts.autoreply_subjects)
  if hit then return "Subject " .. hit end
  for _, phrase in ipairs(opts.autoreply_phrases) do
    if phrase ~= "" and subject:find(phrase:lower(), 1, true) then return "Subject " .. phrase end
  end
  for _, name in ipairs{ "User-Agent", "X-Mailer" } do
    hit = starts_with_any(trimmed_lower(ctx:header(name)), opts.autoreply_agents)
    if hit then return name .. " " .. hit end
  end
  local submitted = ctx:header("Auto-Submitted")
  if submitted and trimmed_lower(submitted):match("^[%w-]*") ~= "no" then
    return "Auto-Submitted"
  end
  local precedence = trimmed_lower(ctx:header("Precedence")):match("^[%w-]*")
  for _, p in ipairs(opts.bulk_precedence) do
    if precedence == p:lower() then return "Precedence " .. p end
  end
  for _, name in ipairs(opts.autoreply_headers) do
    if ctx:header(name) then return name end
  end
  return nil
end

-- Whether `sender` matches an entry "user@example.org" or "@example.org".
local function whitelist_sender(sender, entries)
  sender = sender:lower()
  local _, domain = net.split(sender)
  for _, e in ipairs(entries) do
    e = e:lower()
    if e == sender or (domain and e == "@" .. domain) then return true end
  end
  return false
end

-- Whitelists `rcpt` for `ttl`, unless an entry without expiry already covers it.
local function remember(rcpt, reason, ttl)
  local entry, err = store.listed("whitelist", rcpt)
  if entry and entry.expires == nil then return end
  if err == nil then
    local ok, add_err = store.list_add("whitelist", rcpt, reason, ttl)
    if ok then return end
    err = add_err
  end
  milter.log.debug("cannot auto-whitelist", rcpt, err)
end

return {
  description = "auto-whitelist recipients of outgoing mail; mark whitelisted senders, refuse blacklisted ones",
  options = {
    whitelist_senders = {},
    whitelist_ttl = milter.duration "60d",
    blacklist_reply = "Sender email local blacklist",
    blacklist_demerits = 2,
    autoreply_subjects = { "read:", "return receipt", "autoreply:" },
    autoreply_phrases = { "awaits moderator approval" },
    autoreply_agents = { "vacation" },
    bulk_precedence = { "bulk", "junk", "list" },
    autoreply_headers = { "X-Autoreply", "X-Autorespond" },
  },

  mail = function(ctx, sender, args, opts)
    if sender == "" then return end
    local entry, err = store.listed("whitelist", sender)
    if err then milter.log.debug("cannot look up the whitelist", sender, err) end
    if entry then
      -- Proven by SPF pass, a trusted relay, or an earlier policy (spf's access-map WHITELIST).
      if domain_ban.identified(ctx) or ctx.client.trusted or ctx.msg.listed == "WHITELIST" then
        ctx.msg.listed = "WHITELIST"
        if entry.expires then
          store.list_add("whitelist", entry.entry, entry.reason, opts.whitelist_ttl)
        end
      else
        ctx.msg.listed = "PROBATION"
      end
      milter.log.debug(ctx.msg.listed, sender, "by", entry.entry)
      return
    end
    if ctx.client.internal then return end
    local black
    black, err = store.listed("blacklist", sender)
    if err then milter.log.debug("cannot look up the blacklist", sender, err) end
    if black then
      ctx.msg.listed = "BLACKLIST"
      ctx:demerit(opts.blacklist_demerits, "blacklisted sender " .. sender)
      if ctx.msg.bounce then return end
      return milter.reject{ code = 550, xcode = "5.7.1", text = opts.blacklist_reply }
    end
  end,

  rcpt = function(ctx, rcpt, args, opts)
    if ctx.msg.listed == "BLACKLIST" and ctx.msg.bounce
        and not (ctx.msg.signed and ctx.msg.signed[rcpt]) then
      return milter.reject{ code = 550, xcode = "5.7.1", text = opts.blacklist_reply }
    end
  end,

  eom = function(ctx, opts)
    if not ctx.client.internal or not whitelist_sender(ctx.sender, opts.whitelist_senders) then
      return
    end
    local why = autoreply(ctx, opts)
    if why then
      milter.log.debug("autoreply, recipients not whitelisted:", why)
      return
    end
    for _, rcpt in ipairs(ctx.recipients) do
      local _, domain = net.split(rcpt)
      if domain and not site.internal_domain(domain) then
        remember(rcpt, "mail from " .. ctx.sender, opts.whitelist_ttl)
      end
    end
  end,
}
