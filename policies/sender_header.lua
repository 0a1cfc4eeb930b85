-- sender_header: show who really sent a message whose From is someone else's (stock pack;
-- the classic milter's supply_sender, an anti-phishing aid).
--
-- At the end of the headers, for mail from outside with a non-null MAIL FROM: when neither a
-- From nor a Sender header address has the MAIL FROM domain or a parent of it as its domain,
-- add "Sender: <MAIL FROM>", so that mail readers show "sent by X on behalf of Y". A Sender
-- header that is already there is kept, or with rename_sender renamed to X-Original-Sender
-- and replaced by ours.
local milter = require "milter"
local mime = require "milter.mime"
local net = require "milter.net"

-- Whether `domain` is `mail_domain` or a parent of it.
local function covers(domain, mail_domain)
  return domain == mail_domain or mail_domain:sub(-(#domain + 1)) == "." .. domain
end

local function matches(value, mail_domain)
  for _, m in ipairs(mime.addresses(value) or {}) do
    if m.domain and covers(m.domain, mail_domain) then return true end
  end
  return false
end

return {
  description = "add a Sender header when the From domain does not match the MAIL FROM domain",
  options = {
    rename_sender = false,
    original_sender_header = "X-Original-Sender",
  },

  eoh = function(ctx, opts)
    if ctx.client.internal then return end
    local sender = ctx.sender
    if sender == nil or sender == "" then return end
    local address = net.parse_address(sender)
    local mail_domain = address and address.domain
    if not mail_domain then return end
    local present
    for _, h in ipairs(ctx.headers) do
      local name = h.name:lower()
      if name == "from" or name == "sender" then
        if matches(h.value, mail_domain) then return end
        if name == "sender" then present = present or h.value end
      end
    end
    local ours = "<" .. sender .. ">"
    if not present then
      milter.log.debug("sender_header: supplying MAIL FROM as Sender:", ours)
      ctx:add_header("Sender", ours)
    elseif opts.rename_sender then
      milter.log.debug("sender_header: replacing Sender", present, "by", ours)
      ctx:change_header("Sender", 1, ours)
      ctx:add_header(opts.original_sender_header, present)
    end
  end,
}
