"""The human output of the analyst commands: planted rows give exactly these tables."""

from __future__ import annotations

import math

from segments import tables as tb
from segments.cli import format_customer, similar_table


def test_value_formats() -> None:
    assert tb.percent(0.1234) == "12.3 %" and tb.percent(None) == ""
    assert tb.money(65002, "GBP") == "£65,002.00"
    assert tb.money(-3.5, "GBP") == "-£3.50"
    assert tb.money(1234.5, None) == "1,234.50"
    assert tb.money(10, "CHF") == "10.00 CHF"
    assert tb.days(1.3409722222222222) == "1.3"
    assert tb.number(4268) == "4,268" and tb.number(0.98765) == "0.988"
    assert tb.number(math.nan) == "" and tb.text(["a", "b"]) == "a, b"


def test_similar_table_is_plain_and_rounded() -> None:
    rows = [
        {"customer": "14159", "similarity": 0.98321, "rfm_segment": "Loyal",
         "segment": "Mid-range loyalists", "churn_probability": 0.0291,
         "predicted_spend": 1927.049},
        {"customer": "12415", "similarity": 0.9, "rfm_segment": "Champions",
         "segment": "x", "churn_probability": 0.5, "predicted_spend": 22652.6},
    ]  # fmt: skip
    assert similar_table(rows, "GBP").splitlines() == [
        "customer  similarity  RFM segment  behavioural segment   churn  predicted spend",
        "--------  ----------  -----------  -------------------  ------  ---------------",
        "14159          0.983  Loyal        Mid-range loyalists   2.9 %        £1,927.05",
        "12415          0.900  Champions    x                    50.0 %       £22,652.60",
    ]


def test_customer_block_reads_as_text() -> None:
    info = {
        "customer": "12346", "as_of": "2011-12-10", "first_seen": "2011-01-18",
        "last_seen": "2011-12-09", "events": {"purchase": 1200, "return": 3},
        "rfm_segment": "Champions", "rfm_code": "555", "segment_id": 2,
        "segment": "Premium teacup loyalists", "churn_probability": 0.0312,
        "high_value_probability": 0.9, "horizon_days": 90, "predicted_spend": 64000.0,
        "predicted_spend_method": "last_window", "recent_spend": 65002.0,
        "recency_days": 1.3409722222222222, "frequency": 34, "monetary": 280206.02,
        "currency": "GBP",
        "top_items": [{"item": "23166", "title": "Medium Ceramic Top Storage Jar", "bought": 74215}],
    }  # fmt: skip
    lines = format_customer(info).splitlines()
    assert lines[0] == "customer                  12346"
    assert "events                    purchase 1,200, return 3" in lines
    assert "behavioural segment       2: Premium teacup loyalists" in lines
    assert "churn probability         3.1 % (no purchase in 90 days)" in lines
    assert (
        "predicted spend, 90 days  £64,000.00 (same as the last 90 days; chosen on a "
        "validation window)" in lines
    )
    assert "spend, last 90 days       £65,002.00" in lines
    assert "last purchase             1.3 days before the as-of date" in lines
    assert lines[-3:] == [
        " units  item   title",
        "------  -----  ------------------------------",
        "74,215  23166  Medium Ceramic Top Storage Jar",
    ]
    assert "None" not in "\n".join(lines) and "-" not in lines[6]
