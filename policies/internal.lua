-- internal: rules for the site's own hosts and for bounces (stock pack).
--
-- At MAIL: a null sender (a DSN) from an internal host that is not one of [site] internal_mtas
-- is refused: PCs do not send DSNs (broken return-receipt clients do). With internal_policy on,
-- internal senders (internal networks, SMTP AUTH) are held to the SPF-Pass access-map policy of
-- their MAIL FROM. A client of the internal networks (not authenticated, not a trusted relay,
-- not localhost, not one of [site] internal_mtas) whose MAIL FROM domain is not one of
-- [site] internal_domains is a zombie PC (when internal_domains is set).
-- At RCPT: MAILER-DAEMON@... and auto-notify@... accept no mail; private_relay domains take mail
-- only from internal clients.
-- At DATA: a bounce to more than one recipient is refused.
-- Every refusal answers at once (never held back by delay_reject).
local milter = require "milter"
local site = require "milter.site"
local access = require "milter.access"
local net = require "milter.net"

local fill = milter.fill

local function refuse(text, values)
  return milter.reject{ code = 550, xcode = "5.7.1", text = fill(text, values or {}), immediate = true }
end

local function contains(list, word)
  word = word:lower()
  for _, item in ipairs(list) do
    if item:lower() == word then return item end
  end
end

-- The local part and (lowercased) domain of an envelope address.
local function parts(address)
  local a = net.parse_address(address)
  if a then return a["local"], a.domain end
  return net.split(address)
end

local function is_bounce(sender, opts)
  if sender == "" then return true end
  local user = parts(sender)
  return contains(opts.bounce_senders, user) ~= nil
end

return {
  description = "no DSNs from internal PCs, no mail to MAILER-DAEMON, private relay domains, one recipient per bounce",
  options = {
    refuse_pc_dsn = true,
    pc_dsn_reply = {
      "Your PC is trying to send a DSN even though it is not an MTA.",
      "If you are running MS Outlook, it is broken.  If you want to",
      "send return receipts, use a more standards compliant email client.",
    },
    no_mail_users = { "MAILER-DAEMON", "auto-notify" },
    no_mail_reply = "{user} does not accept mail",
    private_relay = {},
    relay_reply = "Unauthorized relay for {domain}",
    zombie_check = true,
    zombie_reply = {
      "Your PC is using an unauthorized MAIL FROM.",
      "It is either badly misconfigured or controlled by organized crime.",
    },
    bounce_senders = {},
    multiple_dsn_reply = "DSN to multiple recipients",
    internal_policy = false,
    internal_policy_reply = {
      "We don't accept internal mail from {domain}",
      "Your email from {domain} comes from an internal IP, however",
      "internal senders are not authorized to use {domain}.",
    },
  },

  mail = function(ctx, sender, args, opts)
    local client = ctx.client
    local ip = client.ip
    if sender == "" and opts.refuse_pc_dsn and ip and not client.localhost
        and site.internal(ip) and not site.internal_mta(ip) then
      milter.log.debug("internal: REJECT: pretend MTA at", ip, "sending a DSN")
      return refuse(opts.pc_dsn_reply)
    end
    if opts.zombie_check and sender ~= "" and client.internal and not client.authenticated
        and not client.trusted and not client.localhost and #site.internal_domains() > 0
        and not site.internal_mta(ip) then
      local _, domain = parts(sender)
      if not domain or not site.internal_domain(domain) then
        milter.log.debug("internal: REJECT: zombie PC at", ip, "sending MAIL FROM", sender)
        return refuse(opts.zombie_reply)
      end
    end
    if opts.internal_policy and client.internal then
      local identity = sender
      if identity == "" then identity = "postmaster@" .. (ctx.helo or "") end
      local _, domain = parts(identity)
      local policy = access.lookup("SPF-Pass", identity)
      if policy == "REJECT" or policy == "BAN" or policy == "TEMPFAIL" then
        milter.log.debug("internal: REJECT: internal mail from", identity, "policy", policy)
        local text = fill(opts.internal_policy_reply, { domain = domain or identity })
        if policy == "TEMPFAIL" then
          return milter.tempfail{ code = 451, xcode = "4.7.1", text = text }
        end
        return milter.reject{ code = 550, xcode = "5.7.1", text = text, immediate = true }
      end
    end
  end,

  rcpt = function(ctx, rcpt, args, opts)
    local user, domain = parts(rcpt)
    local daemon = user and contains(opts.no_mail_users, user)
    if daemon and domain then
      return refuse(opts.no_mail_reply, { user = daemon })
    end
    if domain and not ctx.client.internal and contains(opts.private_relay, domain) then
      return refuse(opts.relay_reply, { domain = domain })
    end
  end,

  data = function(ctx, opts)
    if is_bounce(ctx.sender, opts) and #ctx.recipients > 1 then
      return refuse(opts.multiple_dsn_reply)
    end
  end,
}
