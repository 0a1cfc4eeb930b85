-- lib/message: the whole message as the MTA sent it, for policies that read or keep it
-- (defang, archive). Each such policy has a body handler that calls message.collect; the chunks
-- are kept once per message in ctx.msg, however many policies collect them.
--   local message = require "lib.message"
--   body = function(ctx, chunk) message.collect(ctx, chunk, "mypolicy") end,
--   eom  = function(ctx) local text = message.text(ctx) ... end,
-- Documented in docs/policies/lib/message.md.
local milter = require "milter"

local M = {}

local KEY = "lib.message"

-- Keeps `chunk` of the body. `who` names the calling policy: the first policy that collects
-- for a message keeps the chunks, the others' calls are no-ops. A body longer than `max_size`
-- bytes (default M.max_size) is not kept: it would count against the Lua state's memory limit.
function M.collect(ctx, chunk, who, max_size)
  local state = ctx.msg[KEY]
  if not state then
    state = { owner = who, chunks = {}, size = 0 }
    ctx.msg[KEY] = state
  end
  if state.owner ~= who or state.too_big then return end
  state.size = state.size + #chunk
  if state.size > (max_size or M.max_size) then
    state.too_big = true
    state.chunks = {}
  else
    state.chunks[#state.chunks + 1] = chunk
  end
end

-- The default largest body kept: 10 MiB.
M.max_size = 10 * 1024 * 1024

-- The body collected so far (CRLF line ends, as the MTA sent it), "" when none was; nil,
-- "too big" when it was longer than the collector's max_size.
function M.body(ctx)
  local state = ctx.msg[KEY]
  if state and state.too_big then return nil, "too big" end
  return state and table.concat(state.chunks) or ""
end

-- The header block: one `Name: value` line per header, CRLF line ends, blank line included.
function M.header_block(ctx)
  local lines = {}
  for i, h in ipairs(ctx.headers) do
    local value = h.value:gsub("\r?\n", "\r\n")
    lines[i] = h.name .. ": " .. value .. "\r\n"
  end
  lines[#lines + 1] = "\r\n"
  return table.concat(lines)
end

-- The whole message: header block and body; nil, "too big" as M.body.
function M.text(ctx)
  local body, err = M.body(ctx)
  if not body then return nil, err end
  return M.header_block(ctx) .. body
end

-- M.text for a policy's end of message: nil (and a warning naming policy `who`) when the body
-- was over max_size.
function M.text_for(ctx, who)
  local text = M.text(ctx)
  if not text then
    milter.log.warn(who .. ": message larger than max_size, passed untouched", ctx.queue_id)
  end
  return text
end

return M
