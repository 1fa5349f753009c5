% rebase('base.tpl', title='Events', script='tail.js')
<h1>Events</h1>
% include('filter_form.tpl', action='/events', show_kind=True)
<p class="actions">
% if not get('page_token'):
<button type="button" id="tail-toggle" data-cursor="{{cursor}}" data-query="{{urlencode(filter)}}">Live tail</button>
<span id="tail-status" class="muted"></span>
% end
</p>
% include('events_table.tpl', events=events, live=True)
<p class="pager">
% if get('page_token'):
<a href="/events?{{urlencode(filter)}}">newest</a>
% end
% if next_page_token:
<a href="/events?{{urlencode(dict(filter, page_token=next_page_token))}}">older →</a>
% end
</p>
