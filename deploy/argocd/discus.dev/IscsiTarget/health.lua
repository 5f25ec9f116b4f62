-- Argo CD health of a discus IscsiTarget, from the kstatus conditions discus's agents write:
-- Healthy when Ready (served by every storage node it selects); Degraded when Stalled (only a
-- person can fix it: an IQN another target holds, a LUN its backend cannot serve); Progressing
-- while nodes set it up (its image importing, say), or until the agents have seen the latest
-- spec or reported at all. Runs without Lua's standard libraries, as argocd-cm checks do.
local function condition(type)
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

if obj.status == nil or obj.status.conditions == nil then
  return {status = "Progressing", message = "Waiting for a storage node's agent to report"}
end
local observed = obj.status.observedGeneration
if obj.metadata.generation ~= nil and observed ~= nil and observed ~= obj.metadata.generation then
  return {status = "Progressing", message = "Waiting for the agents to see generation " .. obj.metadata.generation}
end
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  return {status = "Degraded", message = stalled.message}
end
local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  return {status = "Healthy", message = ready.message}
end
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  return {status = "Progressing", message = ready.message}
end
return {status = "Progressing", message = "Waiting for the agents"}
