-- srs: signed envelope senders against backscatter (stock pack; the classic milter's [srs]).
--
-- EOM, mail from inside (internal networks, SMTP AUTH, localhost) to at least one recipient
-- outside [site] internal_domains: a sender in batv_domains gets a BATV return path
-- (prvs=KDDDSSSSSS=user@domain), any other sender outside internal_domains an SRS one under
-- srs_domain (mail the site forwards), through ctx:change_sender.
-- MAIL: a null sender, or a local part in bounce_senders, makes the message a bounce
-- (ctx.msg.bounce).
-- RCPT of a bounce: an SRS address under srs_domain/srs_domains or a prvs= address in
-- batv_domains is verified. Valid: the original address is logged and published in
-- ctx.msg.signed[rcpt] (the greylist and whitelist policies let that recipient through), and at
-- EOM the recipient is replaced by the original when rewrite_recipients is on. Invalid, from
-- outside: 550 5.7.1 srs_reply / batv_reply. An unsigned bounce to a batv_domains user, from
-- outside: refused (they send only signed mail), unless the sender is whitelisted.
-- EOM of an unsigned bounce (null sender, bounce_senders, or a delivery-status report): a
-- returned header (Message-ID, X-Mailer, Sender, References) that carries one of our SRS
-- tokens is a delayed failure of a message we sent to that address: the address is
-- blacklisted and the bounce discarded (a copy is kept in [site] save_dir, "dsn").
local milter = require "milter"
local archive = require "milter.archive"
local srs = require "milter.srs"
local site = require "milter.site"
local net = require "milter.net"
local store = require "milter.store"
local message = require "lib.message"

local fill = milter.fill

-- The signer of each options table (one per Lua state and generation).
local signers = setmetatable({}, { __mode = "k" })

local function secrets(opts)
  local out = {}
  for _, item in ipairs(opts.secrets) do
    local path = item:match("^file:(.+)$")
    if path then
      local list, err = site.read_list(path)
      if not list then
        error(("srs: secrets: cannot read %s (%s)"):format(path, err), 0)
      end
      for _, secret in ipairs(list) do out[#out + 1] = secret end
    else
      out[#out + 1] = item
    end
  end
  return out
end

-- The policy's signer: its own secrets, else the site's ([srs] secrets).
local function signer(opts)
  if #opts.secrets == 0 then return (srs.site()) end
  local s = signers[opts]
  if not s then
    s = srs.new{ secrets = secrets(opts), max_age = opts.max_age, hash_length = opts.hash_length }
    signers[opts] = s
  end
  return s
end

local function member(list, word)
  if not word then return false end
  word = word:lower()
  for _, item in ipairs(list) do
    if item:lower() == word then return true end
  end
  return false
end

-- The local part and (lowercased) domain of an envelope address.
local function parts(address)
  local a = net.parse_address(address)
  if a then return a["local"], a.domain, a.address end
  local user, domain = net.split(address)
  return user, domain, address
end

local function srs_domain(domain, opts)
  return domain ~= nil and (domain == opts.srs_domain:lower() or member(opts.srs_domains, domain))
end

local function outsider(client)
  return not (client.internal or client.trusted or client.localhost)
end

local function refuse(text, values)
  return milter.reject{ code = 550, xcode = "5.7.1", text = fill(text, values or {}), immediate = true }
end

-- Whether the message is a delivery-status report (RFC 3464).
local function delivery_report(ctx)
  local ctype = (ctx:header("Content-Type") or ""):lower()
  return ctype:find("multipart/report", 1, true) ~= nil
    and ctype:find("report%-type%s*=%s*\"?delivery%-status") ~= nil
end

-- Whether the lowercased Subject reads like a failure notice.
local function failure_subject(ctx, opts)
  local subject = (ctx:header("Subject") or ""):lower()
  for _, pattern in ipairs(opts.failure_subjects) do
    if subject:find(pattern) then return true end
  end
  return false
end

local TRACE_HEADERS = { ["message-id"] = true, ["x-mailer"] = true, sender = true, references = true }

-- The first SRS token in a returned message's Message-ID, X-Mailer, Sender or References
-- (folded lines included); the scan stops at a report's "Action:" other than failed.
local function find_token(body)
  local current
  for line in body:gmatch("([^\n]*)\n?") do
    line = line:gsub("\r$", "")
    local action = line:match("^[Aa]ction:%s*(.-)%s*$")
    if action and action:lower():match("(%S+)$") ~= "failed" then return nil end
    local name = line:match("^([%w-]+):")
    if name then
      current = name:lower()
    elseif not line:match("^%s") then
      current = nil
    end
    if current and TRACE_HEADERS[current] then
      local token = line:match("<([Ss][Rr][Ss][01][=+-][^>]*@[^>]+)>")
      if token then return token end
    end
  end
  return nil
end

-- Signs the envelope sender of mail leaving the site; the new address, or nil.
local function signed_sender(ctx, opts)
  local sender = ctx.sender
  local client = ctx.client
  if sender == "" or ctx.msg.bounce or not (client.internal or client.localhost) then return nil end
  local leaves = false
  for _, rcpt in ipairs(ctx.recipients) do
    local _, domain = parts(rcpt)
    if domain and not site.internal_domain(domain) then leaves = true end
  end
  if not leaves or srs.is_srs(sender) or srs.is_batv(sender) then return nil end
  local _, domain = parts(sender)
  if not domain then return nil end
  local s = signer(opts)
  if member(opts.batv_domains, domain) then
    return s:sign(sender)
  elseif opts.srs_domain ~= "" and not site.internal_domain(domain) and not srs_domain(domain, opts) then
    return s:forward(sender, opts.srs_domain)
  end
  return nil
end

return {
  description = "SRS and BATV signed return paths; refuse forged bounces; blacklist senders our bounces fail for",
  -- The body handler only collects bounces for the delayed-failure scan.
  noreply = { "body" },
  options = {
    secrets = {},
    max_age = milter.duration "21d",
    hash_length = 4,
    srs_domain = "",
    srs_domains = {},
    batv_domains = {},
    bounce_senders = {},
    rewrite_recipients = true,
    reject_unsigned = true,
    srs_reply = "Invalid SRS signature",
    batv_reply = "Invalid BATV signature",
    null_bounce_reply = {
      "I did not send you that message. Please consider implementing SPF",
      "(RFC 7208) to avoid bouncing mail to spoofed senders.",
      "Thank you.",
    },
    pseudo_bounce_reply = {
      "I do not accept normal mail from {user}.",
      "Mail from this site carries a signed return path, so this",
      "cannot be a reply to a message sent from here.",
    },
    backscatter = true,
    failure_subjects = {
      "^failure notice", "^returned mail", "^undeliver", "delivery.*fail", "delivery problem",
      "not be delivered", "user unknown", "^failed", "^mail failed", "^echec de distribution",
      "error sending", "^fallo en la entrega", "fehlgeschlagen",
    },
    blacklist_ttl = 0,
    max_scan = 262144,
    keep_copies = true,
  },

  -- No secret, or a bad max_age or hash_length, stops the policy from loading (`luamilter
  -- check` says so). Secret files are read at first use (reading a file may not block here).
  setup = function(opts)
    if #opts.secrets == 0 then
      if srs.site() then return end
      error("[policy.srs] secrets: at least one secret is needed (here or in [srs])", 0)
    end
    for _, item in ipairs(opts.secrets) do
      if item:match("^file:") then return end
    end
    signer(opts)
  end,

  mail = function(ctx, sender, args, opts)
    local user = parts(sender)
    ctx.msg.bounce = ctx.sender == "" or member(opts.bounce_senders, user)
    -- This message's own state: mail to postmaster, and the body kept for the scan.
    ctx.vars.to_postmaster, ctx.vars.returned = false, nil
  end,

  rcpt = function(ctx, rcpt, args, opts)
    local user, domain, address = parts(rcpt)
    if user and user:lower() == "postmaster" then ctx.vars.to_postmaster = true end
    if not ctx.msg.bounce or not domain then return end
    local s = signer(opts)
    local original, err, kind
    if srs.is_srs(address) and srs_domain(domain, opts) then
      kind = "SRS"
      original, err = s:reverse(address)
    elseif srs.is_batv(address) and member(opts.batv_domains, domain) then
      kind = "BATV"
      original, err = s:verify(address)
    end
    if original then
      milter.log.debug("srs: signed bounce to", address, "for", original)
      ctx.msg.signed = ctx.msg.signed or {}
      ctx.msg.signed[rcpt] = original
      return
    end
    if not outsider(ctx.client) then
      if kind then milter.log.debug("srs: invalid", kind, "address from inside:", address, err) end
      return
    end
    if kind then
      milter.log.debug("srs: REJECT invalid", kind, "signature", address, err)
      return refuse(kind == "SRS" and opts.srs_reply or opts.batv_reply)
    end
    -- postmaster takes every bounce (RFC 5321): delayed failures are reported there.
    if opts.reject_unsigned and member(opts.batv_domains, domain) and user:lower() ~= "postmaster" then
      if ctx.sender ~= "" and store.listed("whitelist", ctx.sender) then return end
      milter.log.debug("srs: REJECT unsigned bounce from", ctx.sender, "to", address)
      if ctx.sender == "" then return refuse(opts.null_bounce_reply) end
      return refuse(opts.pseudo_bounce_reply, { user = parts(ctx.sender) })
    end
  end,

  body = function(ctx, chunk, opts)
    if not opts.backscatter or ctx.msg.signed then return end
    if not (ctx.msg.bounce or delivery_report(ctx)
        or (ctx.vars.to_postmaster and failure_subject(ctx, opts))) then
      return
    end
    local seen = ctx.vars.returned or ""
    if #seen < opts.max_scan then ctx.vars.returned = seen .. chunk:sub(1, opts.max_scan - #seen) end
  end,

  eom = function(ctx, opts)
    if ctx.vars.returned then
      local token = find_token(ctx.vars.returned)
      local site_signer = srs.site()
      local original = token and (signer(opts):reverse(token)
        or (site_signer and site_signer:reverse(token)))
      if original then
        local subject = ctx:header("Subject") or "DSN"
        local ttl = opts.blacklist_ttl > 0 and opts.blacklist_ttl or nil
        local ok, err = store.list_add("blacklist", original, "delayed failure: " .. subject, ttl)
        if not ok then milter.log.warn("srs: cannot blacklist", original, err) end
        milter.log.info("srs: DISCARD delayed failure for", original, "blacklisted:", subject)
        if opts.keep_copies then
          archive.keep("dsn", message.header_block(ctx) .. ctx.vars.returned)
        end
        return milter.discard()
      end
    end
    if ctx.msg.signed and opts.rewrite_recipients then
      for rcpt, original in pairs(ctx.msg.signed) do
        ctx:delete_rcpt("<" .. rcpt .. ">")
        ctx:add_rcpt("<" .. original .. ">")
      end
    end
    local new, err = signed_sender(ctx, opts)
    if new then
      milter.log.debug("srs: sender", ctx.sender, "signed as", new)
      ctx:change_sender("<" .. new .. ">")
    elseif err then
      milter.log.warn("srs: cannot sign", ctx.sender, err)
    end
  end,
}
