-- A dead letter is kept once: a broker redelivers a message whose dead letter was committed
-- but not yet acknowledged (an ingester killed between the two), and the same bytes on the same
-- topic say nothing new. Found by the chaos soak (pumpfleet soak): a payload dead-lettered
-- twice. Copies already stored are removed, keeping the first.
DELETE FROM dead_letter d USING dead_letter e
WHERE d.topic = e.topic AND d.payload = e.payload AND d.id > e.id;
CREATE UNIQUE INDEX dead_letter_once ON dead_letter (topic, sha256(payload));
