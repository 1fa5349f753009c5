% rebase('base.tpl', title='Alerts', refresh_s=60)
<h1>Alerts</h1>
<p class="muted">Brute force, suspicious processes, chain breaks and forks, dropped events: every alert event the agents and the hub raised.</p>
% include('filter_form.tpl', action='/alerts', show_kind=False)
% include('events_table.tpl', events=events)
<p class="pager">
% if next_page_token:
<a href="/alerts?{{urlencode(dict(filter, page_token=next_page_token))}}">older →</a>
% end
</p>
<h2>New and changed devices</h2>
% include('events_table.tpl', events=device_changes)
