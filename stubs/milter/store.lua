---@meta
-- luamilter editor stubs: `require "milter.store"`. Reference: docs/lua-api/store.md.

---Why the store could not answer: the second value of a function that returned nil.
---@alias luamilter.StoreError "unavailable"|"timeout"|"invalid"

---A stored value: a string, a number, a boolean, or a flat table (a list, or string keys) of
---those.
---@alias luamilter.StoreValue string|number|boolean|table

---@alias luamilter.BanKind "ip"|"domain"

---@alias luamilter.AddressList "whitelist"|"blacklist"

---A ban or list entry; times are unix seconds.
---@class luamilter.ListEntry
---@field entry string
---@field reason string
---@field created integer
---@field expires integer|nil nil for an entry without expiry

---The options of `store.greylist` (all optional).
---@class luamilter.GreylistOptions
---@field delay? luamilter.Duration how long a new triplet is refused (default "5m")
---@field retry_window? luamilter.Duration the first retry must come within this time (default "6h")
---@field lifetime? luamilter.Duration how long a passed triplet is remembered (default "36d")
---@field ipv4_prefix? integer IPv4 grouping prefix length (default 24)
---@field ipv6_prefix? integer IPv6 grouping prefix length (default 64)
---@field auto_pass? integer after this many passed triplets every triplet of the client passes (default 0: off)

---State that outlives a connection and a restart (SQLite or Redis). Every function suspends
---only the calling session; when the store cannot answer it returns `nil, err`. A wrong
---argument (unknown list, nested table, bad duration) raises.
---@class milter.store
local store = {}

---The value stored at `key`, or nil if there is none.
---@param key string
---@return luamilter.StoreValue|nil value
---@return luamilter.StoreError|nil err
function store.get(key) end

---Stores `value` (replacing any value and expiry); with `ttl` the key disappears after that long.
---@param key string
---@param value luamilter.StoreValue
---@param ttl? luamilter.Duration
---@return true|nil ok
---@return luamilter.StoreError|nil err
function store.set(key, value, ttl) end

---Removes `key`: true if it existed, false if there was nothing to remove.
---@param key string
---@return boolean|nil existed
---@return luamilter.StoreError|nil err
function store.delete(key) end

---Adds `by` (default 1) to the integer at `key` and returns the new value; `ttl` applies when
---the key is created.
---@param key string
---@param by? integer
---@param ttl? luamilter.Duration
---@return integer|nil value
---@return luamilter.StoreError|nil err
function store.incr(key, by, ttl) end

---Gives an existing key a new lifetime counted from now; false if the key does not exist.
---@param key string
---@param ttl luamilter.Duration
---@return boolean|nil existed
---@return luamilter.StoreError|nil err
function store.expire(key, ttl) end

---Records one event under `key` and returns how many events it had in the last `window`.
---@param key string
---@param window luamilter.Duration
---@return integer|nil events
---@return luamilter.StoreError|nil err
function store.count(key, window) end

---Decays the amounts at `key` (each halves every `half_life`), adds `add` atomically and
---returns them all (`{}` when none); without `add` it only reads.
---@param key string
---@param half_life luamilter.Duration
---@param add? table<string, number>
---@return table<string, number>|nil amounts
---@return luamilter.StoreError|nil err
function store.decay(key, half_life, add) end

---Records a delivery attempt of (client, sender, recipient): `"wait", seconds` (answer with a
---temporary failure), `"pass", passes`, or `nil, err`.
---@param ip string normally `ctx.client.ip` (grouped by /24 or /64); any other string is used as is
---@param sender string
---@param rcpt string
---@param opts? luamilter.GreylistOptions
---@return "pass"|"wait"|nil verdict
---@return integer|luamilter.StoreError n seconds to wait, passes so far, or the error
function store.greylist(ip, sender, rcpt, opts) end

---Adds or replaces a ban; without `ttl` the ban is permanent.
---@param kind luamilter.BanKind
---@param key string an IP address, a domain, or "*.domain" for every subdomain
---@param reason? string
---@param ttl? luamilter.Duration
---@return true|nil ok
---@return luamilter.StoreError|nil err
function store.ban(kind, key, reason, ttl) end

---The matching ban entry, or false when `key` is not banned.
---@param kind luamilter.BanKind
---@param key string
---@return luamilter.ListEntry|false|nil entry
---@return luamilter.StoreError|nil err
function store.banned(kind, key) end

---Removes a ban entry (the exact entry); false if absent.
---@param kind luamilter.BanKind
---@param key string
---@return boolean|nil existed
---@return luamilter.StoreError|nil err
function store.unban(kind, key) end

---All live bans of `kind`, sorted by entry; with `search`, those whose entry or reason contains it.
---@param kind luamilter.BanKind
---@param search? string
---@return luamilter.ListEntry[]|nil entries
---@return luamilter.StoreError|nil err
function store.bans(kind, search) end

---Adds or replaces an entry of the whitelist or blacklist (an address, a domain or an IP).
---@param list luamilter.AddressList
---@param entry string
---@param reason? string
---@param ttl? luamilter.Duration
---@return true|nil ok
---@return luamilter.StoreError|nil err
function store.list_add(list, entry, reason, ttl) end

---The matching entry (for the address or its domain), or false.
---@param list luamilter.AddressList
---@param key string
---@return luamilter.ListEntry|false|nil entry
---@return luamilter.StoreError|nil err
function store.listed(list, key) end

---Removes an entry; false if absent.
---@param list luamilter.AddressList
---@param entry string
---@return boolean|nil existed
---@return luamilter.StoreError|nil err
function store.list_remove(list, entry) end

---All live entries of the list sorted by entry, optionally filtered like `bans`.
---@param list luamilter.AddressList
---@param search? string
---@return luamilter.ListEntry[]|nil entries
---@return luamilter.StoreError|nil err
function store.list(list, search) end

return store
