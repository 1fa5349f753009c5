<form class="filters" method="get" action="{{action}}">
<label>since <input name="since" value="{{filter['since']}}" placeholder="1h, 7d, 2026-11-22T18:00" size="14"></label>
<label>until <input name="until" value="{{filter['until']}}" placeholder="now" size="14"></label>
<label>host <input name="host" value="{{filter['host']}}" size="12"></label>
<label>agent <select name="agent"><option value="">any</option>
% for k in model.AGENT_KINDS:
<option{{!' selected' if filter['agent'] == k else ''}}>{{k}}</option>
% end
</select></label>
% if show_kind:
<label>kind <select name="kind"><option value="">any</option>
% for k in model.KINDS:
<option{{!' selected' if filter['kind'] == k else ''}}>{{k}}</option>
% end
</select></label>
<label><input type="checkbox" name="heartbeats" value="1"{{!' checked' if filter['heartbeats'] else ''}}> heartbeats</label>
% end
<label>severity ≥ <select name="severity"><option value="">any</option>
% for s in model.SEVERITIES:
<option{{!' selected' if filter['severity'] == s else ''}}>{{s}}</option>
% end
</select></label>
<label>text <input name="text" value="{{filter['text']}}" size="18"></label>
<button type="submit">Search</button>
</form>
