---@meta
-- luamilter editor stubs: the table a policy file returns (not a module: nothing requires it).
-- Reference: docs/lua-api/policy.md. Annotate with `---@type luamilter.Policy` on a local
-- that the file returns (docs/editor.md).

---@alias luamilter.Stage "connect"|"helo"|"mail"|"rcpt"|"data"|"header"|"eoh"|"body"|"eom"|"abort"|"close"|"unknown"

---What the MTA must send although luamilter cannot tell from the code: "headers" (code reaches
---the headers in a way the source scan cannot see), "rejected_recipients" (recipients the MTA
---refused itself reach `rcpt` handlers too). The envelope entries are accepted and do nothing:
---the envelope is always sent.
---@alias luamilter.Need "headers"|"body"|"rejected_recipients"|"client"|"helo"|"sender"|"recipients"

---Stages whose handlers may be declared not to answer.
---@alias luamilter.NoreplyStage "connect"|"helo"|"mail"|"rcpt"|"data"|"header"|"eoh"|"body"|"unknown"

---The ESMTP parameters of MAIL FROM or RCPT TO, keyed by upper-cased name: `args.SIZE == "1234"`;
---a parameter without `=` is `true`.
---@alias luamilter.EsmtpArgs table<string, string|boolean>

---The MTA macros to ask for, per stage: `{ mail = { "{auth_authen}" }, connect = { "j" } }`.
---@class luamilter.Macros
---@field connect? string[]
---@field helo? string[]
---@field mail? string[]
---@field rcpt? string[]
---@field data? string[]
---@field eoh? string[]
---@field eom? string[]

---A policy file returns this table: handlers named after the stages, and declarations. Every
---handler gets `ctx` first and the policy's effective options last, and returns nil (continue)
---or a verdict.
---@class luamilter.Policy
---@field name? string must equal the file name without `.lua`
---@field description? string free text
---@field options? table the options and their defaults; `[policy.NAME]` in the config overrides them
---@field needs? luamilter.Need[] what the MTA must send although the code does not show it
---@field noreply? luamilter.NoreplyStage[] stages whose handlers only collect and never answer
---@field macros? luamilter.Macros MTA macros to ask for, per stage
---@field setup? fun(opts: table) run once per Lua state at load with the effective options; an error is a load error
---@field connect? fun(ctx: luamilter.Ctx, hostname: string, ip: string|nil, opts: table): luamilter.Verdict|nil
---@field helo? fun(ctx: luamilter.Ctx, name: string, opts: table): luamilter.Verdict|nil
---@field mail? fun(ctx: luamilter.Ctx, sender: string, args: luamilter.EsmtpArgs, opts: table): luamilter.Verdict|nil
---@field rcpt? fun(ctx: luamilter.Ctx, rcpt: string, args: luamilter.EsmtpArgs, opts: table): luamilter.Verdict|nil
---@field data? fun(ctx: luamilter.Ctx, opts: table): luamilter.Verdict|nil
---@field header? fun(ctx: luamilter.Ctx, name: string, value: string, opts: table): luamilter.Verdict|nil
---@field eoh? fun(ctx: luamilter.Ctx, opts: table): luamilter.Verdict|nil
---@field body? fun(ctx: luamilter.Ctx, chunk: string, opts: table): luamilter.Verdict|nil
---@field eom? fun(ctx: luamilter.Ctx, opts: table): luamilter.Verdict|nil
---@field abort? fun(ctx: luamilter.Ctx, opts: table)
---@field close? fun(ctx: luamilter.Ctx, opts: table)
---@field unknown? fun(ctx: luamilter.Ctx, line: string, opts: table): luamilter.Verdict|nil
