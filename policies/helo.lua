-- helo: HELO and PTR sanity for clients from outside (stock pack).
--
-- At connect: a client whose verified name is "localhost" but whose address is not, or whose
-- name is ".", is refused (held until DATA when [site] delay_reject is on).
-- At HELO: a bare IPv4 address as HELO name is refused ("[192.0.2.1]" literals are fine); a
-- name in [site] hello_blacklist is refused and costs demerits. Both answer at once.
-- At MAIL: a client that never said HELO is refused, internal or not.
-- A HELO after a MAIL FROM on the same connection costs helo_after_mail_demerits, any client.
-- Internal clients (internal_networks, SMTP AUTH) may use any HELO: copiers do odd things.
local milter = require "milter"
local site = require "milter.site"

local fill = milter.fill

local function refuse(text)
  return milter.reject{ code = 550, xcode = "5.7.1", text = text, immediate = true }
end

local function dotted_quad(name)
  local a, b, c, d = name:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return false end
  for _, octet in ipairs{ a, b, c, d } do
    if tonumber(octet) > 255 then return false end
  end
  return true
end

return {
  description = "refuse numeric and blacklisted HELO names, unreasonable PTR names, MAIL before HELO",
  options = {
    numeric_reply = "hello name cannot be numeric ip",
    blacklist_reply = "Your mail server lies. Its name is *not* {helo}.",
    blacklist_demerits = 4,
    ptr_reply = "\"{ptr}\" is not a reasonable PTR name",
    no_helo_reply = "It's polite to say HELO first.",
    helo_after_mail_demerits = 2,
  },

  connect = function(ctx, hostname, ip, opts)
    local client = ctx.client
    if client.internal or client.localhost or ip == nil then return end
    local name = hostname:lower()
    if name == "localhost" or name == "localhost." or name == "." then
      return milter.reject{ code = 550, xcode = "5.7.1", text = fill(opts.ptr_reply, { ptr = hostname }) }
    end
  end,

  helo = function(ctx, name, opts)
    ctx.vars.said_helo = true
    if ctx.vars.said_mail and opts.helo_after_mail_demerits > 0 then
      ctx:demerit(opts.helo_after_mail_demerits, "HELO " .. name .. " after MAIL FROM")
    end
    if ctx.client.internal then return end
    if dotted_quad(name) then
      return refuse(opts.numeric_reply)
    end
    if site.hello_blacklisted(name) then
      ctx:demerit(opts.blacklist_demerits, "blacklisted HELO " .. name)
      return refuse(fill(opts.blacklist_reply, { helo = name }))
    end
  end,

  mail = function(ctx, sender, args, opts)
    ctx.vars.said_mail = true
    if not ctx.vars.said_helo then
      return refuse(opts.no_helo_reply)
    end
  end,
}
