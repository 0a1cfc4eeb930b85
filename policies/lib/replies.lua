-- lib/replies: templated refusals, the classic milter's errors_url replies.
--
-- When [site] errors_url is set, a templated refusal's first line is
-- `<errors_url>/<template>?<params>`, a page that explains the refusal; the other lines follow.
-- Shared by the stock policies (spf: anon, helofail; bans: bandom; cbv: dsnrefused); site
-- policies may use it too:
--   local replies = require "lib.replies"
-- Documented in docs/policies/lib/replies.md.
local site = require "milter.site"

local M = {}

-- `value` encoded for a query string: unreserved characters and those a query may hold as they
-- are (`@`, `:`, `/`, ...), a space as `+`, anything else as %XX.
local function encode(value)
  return (tostring(value):gsub("[^%w%-%._~!$'()*,;:@/]", function(c)
    if c == " " then return "+" end
    return string.format("%%%02X", c:byte())
  end))
end

-- The page of `template` with `params`, a list of { name, value } pairs in order; nil when
-- errors_url is not set (milter.site.errors_url is false).
function M.url(template, params)
  local base = site.errors_url
  if not base then return nil end
  local query = {}
  for i, pair in ipairs(params or {}) do
    query[i] = encode(pair[1]) .. "=" .. encode(pair[2] == nil and "" or pair[2])
  end
  local url = base .. "/" .. template
  if #query > 0 then url = url .. "?" .. table.concat(query, "&") end
  return url
end

-- The reply lines of a templated refusal: the page first (when errors_url is set), then
-- `lines` (a string or a list of strings; may be nil).
function M.lines(template, params, lines)
  local out = {}
  local url = M.url(template, params)
  if url then out[1] = url end
  if type(lines) == "string" then lines = { lines } end
  for _, line in ipairs(lines or {}) do out[#out + 1] = line end
  return out
end

return M
