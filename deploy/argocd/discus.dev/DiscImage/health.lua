-- Argo CD health of a discus DiscImage, from the kstatus conditions discus's agents write:
-- Healthy when Ready (verified and stored on the nodes that need it); Degraded when Stalled
-- (only a person can fix it: a wrong digest, a hostile or unsupported image); Progressing while
-- it downloads or converts, or until the agents have seen the latest spec or reported at all.
-- Runs without Lua's standard libraries, as argocd-cm checks do.
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
